"""The YAML configuration: frozen pydantic models parsed once at the edge.

Every key is optional with a safe default; unknown keys are errors, because a typo must not
silently disable a limit. Sizes may be percentages of memory, so parsing takes the total
(container limit, else host memory) as an argument rather than reading it here.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from celery_memguard.daemon.units import format_bytes, parse_duration, parse_percent, parse_size
from celery_memguard.protocol.paths import DEFAULT_SOCKET, SOCKET_ENV

DEFAULT_LISTEN = "127.0.0.1:9808"


class ConfigError(Exception):
    """A config the daemon refuses; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _size(value: object, info: ValidationInfo) -> int:
    total = (info.context or {}).get("memory_total")
    return parse_size(value, total)


class AgentConfig(_Section):
    socket: Path = Field(
        default=Path(DEFAULT_SOCKET),
        description=(
            f"Unix socket (SOCK_SEQPACKET) the daemon binds and agents connect to. "
            f"The environment variable {SOCKET_ENV} overrides it."
        ),
    )


class SamplingConfig(_Section):
    interval: float = Field(
        default=1.0, description="Time between two RSS samples of every child (the tick)."
    )
    scan_interval: float = Field(
        default=5.0,
        description="Time between two full process-table scans for new workers (with or without the agent).",
    )

    @field_validator("interval", "scan_interval", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        seconds = parse_duration(value)
        if seconds < 0.01:
            raise ValueError(f"must be at least 10ms, got {value!r}")
        return seconds


class MetricsConfig(_Section):
    listen: str = Field(
        default=DEFAULT_LISTEN,
        description="host:port for /metrics, /healthz and /status. Loopback unless you mean otherwise.",
    )

    max_task_names: int = Field(
        default=50, ge=1, le=10000,
        description="Task names kept as label values; later names are counted as 'other'.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value


class LimitsConfig(_Section):
    measure: Literal["rss", "uss", "pss"] = Field(
        default="rss",
        description=(
            "Which memory figure the soft limit (and predictive recycling) compares: RSS is read "
            "every tick; USS or PSS cost about 30x more and are read only near a limit. The "
            "hard limit always compares RSS, read by each child itself; worker_total sums USS "
            "where it was read."
        ),
    )
    hard: int = Field(
        default=1024**3,
        description="Past this during a task the task is interrupted and the child recycled.",
    )
    soft: int = Field(
        default=512 * 1024**2,
        description="Past this a child is recycled right after its current task (size or % of memory).",
    )
    worker_total: int | None = Field(
        default=None,
        description=(
            "Limit on the sum of a worker's children (USS where sampled, since RSS counts "
            "pages shared with the parent in every child); past it the largest child is "
            "recycled after its task. Unset: no worker-wide limit."
        ),
    )
    kill_after: float = Field(
        default=10.0,
        description=(
            "A child still above the hard limit this long after crossing it (stuck in C code, "
            "or swallowing the interruption) gets SIGTERM, then SIGKILL one tick later."
        ),
    )
    watch_interval: float = Field(
        default=0.01,
        description=(
            "How often each child reads its own RSS while a task runs near the hard limit, to "
            "interrupt a runaway task there (a tick is too slow for a task that grows 1 GiB a "
            "second). Further from the limit it reads less often, at least every 50 ms."
        ),
    )
    container_soft: float | None = Field(
        default=0.85,
        description=(
            "A share of the worker's container memory limit (its memory cgroup's, found from "
            "the worker's own process). Past it (by the working set: usage less inactive page "
            "cache), a child does not start its next task until the container is back under "
            "it (at most container_hold), and the child whose memory grows fastest is "
            "recycled after its task. null turns it off; a worker with no memory limit has "
            "no line."
        ),
    )
    container_hard: float | None = Field(
        default=0.95,
        description=(
            "A share of the container's limit. Past it, the running task that grows most is "
            "interrupted with MemoryLimitExceeded (reason container) and its child recycled, "
            "before the kernel's OOM killer must pick a victim. null turns it off."
        ),
    )
    container_pressure: float | None = Field(
        default=0.4,
        description=(
            "Memory pressure (the share of the last 10 s in which some of the container's "
            "tasks stalled on memory: PSI some avg10) past which, for recycle.grace, the "
            "child that grows fastest is recycled after its task. A PSI trigger at this share "
            "of a short window also wakes the daemon as soon as tasks stall, between ticks. "
            "null turns both off."
        ),
    )
    container_hold: float = Field(
        default=30.0,
        description=(
            "The longest a child waits for headroom before it starts its next task anyway. "
            "A held task is not yet acknowledged to the pool: its time limits do not run."
        ),
    )

    @field_validator("container_soft", "container_hard", "container_pressure", mode="before")
    @classmethod
    def _share(cls, value: object, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        share = parse_percent(value)
        if share <= 0:
            raise ValueError(f"must be above 0%, or null to turn it off, got {value!r}")
        soft = info.data.get("container_soft")
        if info.field_name == "container_hard" and soft is not None and share <= soft:
            raise ValueError(f"must be above limits.container_soft ({soft:.0%}), got {value!r}")
        return share

    @field_validator("container_hold", mode="before")
    @classmethod
    def _hold(cls, value: object) -> float:
        seconds = parse_duration(value)
        if seconds > 3600:
            raise ValueError(f"must be at most an hour, got {value!r}")
        return seconds

    @field_validator("hard", mode="before")
    @classmethod
    def _hard(cls, value: object, info: ValidationInfo) -> int:
        return _size(value, info)

    @field_validator("soft", mode="before")
    @classmethod
    def _soft(cls, value: object, info: ValidationInfo) -> int:
        # hard is declared first so that it is validated first and the error names soft.
        soft = _size(value, info)
        hard = info.data.get("hard")
        if hard is not None and soft >= hard:
            raise ValueError(f"soft ({soft} bytes) must be below limits.hard ({hard} bytes)")
        return soft

    @field_validator("worker_total", mode="before")
    @classmethod
    def _total(cls, value: object, info: ValidationInfo) -> int | None:
        return None if value is None else _size(value, info)

    @field_validator("kill_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("watch_interval", mode="before")
    @classmethod
    def _watch(cls, value: object) -> float:
        seconds = parse_duration(value)
        if not 0.001 <= seconds <= 10:
            raise ValueError(f"must be between 1ms and 10s, got {value!r}")
        return seconds


class RecycleConfig(_Section):
    jitter: float = Field(
        default=0.05,
        description=(
            "Each child's threshold is lowered by a stable random share up to this, "
            "so children do not recycle in lock-step. Only in pools where max_share lets two "
            "or more children recycle at once: one at a time, they cannot."
        ),
    )
    max_per_minute: int = Field(
        default=6, ge=1,
        description=(
            "At most this many recycle requests per worker in any 60 s, against a storm (a "
            "soft limit below what a child needs). A child that ran 20 tasks or more and grew "
            "at least half its way from a fresh child's size to the soft limit (a leak) is "
            "recycled regardless, and does not count."
        ),
    )
    max_share: float = Field(
        default=0.5,
        description=(
            "At most this share of a worker's pool (at least one child) may be asked to recycle "
            "and still be running its last task at once."
        ),
    )
    grace: float = Field(
        default=2.0,
        description=(
            "A limit seen on the tick (an idle child whose end-of-task report was not the one "
            "that crossed, or the worker total) must stay exceeded this long before it acts; "
            "a task-end report acts at once."
        ),
    )
    min_serving: int = Field(
        default=0, ge=0,
        description=(
            "Never ask a child to recycle when that would leave fewer than this many children "
            "of the pool serving (not asked, not leaving). 0: only max_share applies."
        ),
    )
    min_lifetime: float = Field(
        default=0.0,
        description=(
            "A child younger than this is not recycled for its soft limit (nor predicted to "
            "cross it, nor for worker_total), only past the hard limit, so that a soft limit "
            "set below what a child needs cannot churn a pool. Off by default: a child that "
            "leaks fast grows past the soft limit for as long as it is held."
        ),
    )
    skip_within_tasks: int = Field(
        default=2,
        ge=0,
        description="Do not recycle a child that --max-tasks-per-child will recycle within this many tasks.",
    )
    predictive: bool = Field(
        default=False,
        description=(
            "Also recycle an idle child whose recent growth per task would take it past its "
            "soft threshold within predictive_tasks tasks, so its peak stays under the limit."
        ),
    )
    predictive_tasks: int = Field(
        default=2, ge=1, le=100,
        description=(
            "How many tasks ahead predictive recycling looks: the next one, plus one that may "
            "already be on its way to the child when the request arrives."
        ),
    )
    dry_run: bool = Field(
        default=False, description="Log and count what would be recycled, act on nothing."
    )

    @field_validator("grace", mode="before")
    @classmethod
    def _grace(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("min_lifetime", mode="before")
    @classmethod
    def _lifetime(cls, value: object) -> float:
        seconds = parse_duration(value)
        if seconds > 86400:
            raise ValueError(f"must be at most a day, got {value!r}")
        return seconds

    @field_validator("jitter", "max_share", mode="before")
    @classmethod
    def _percent(cls, value: object) -> float:
        return parse_percent(value)


class QuarantineConfig(_Section):
    after: int = Field(
        default=2, ge=0, le=1000,
        description=(
            "A task id that was running at this many OOM kills or memory interrupts of its "
            "worker process is not run again: delivered once more, it fails at once with "
            "MemoryLimitExceeded (reason quarantined), so that a task which kills its worker is "
            "not redelivered forever. 0 turns the quarantine off."
        ),
    )


class ForensicsConfig(_Section):
    enabled: bool = Field(
        default=True,
        description=(
            "Leak forensics: trace a leaking task name's calls in one pool child to name the "
            "lines that keep its memory. false: no trace at all, automatic or asked for."
        ),
    )
    auto: bool = Field(
        default=True,
        description=(
            "Trace a task name as soon as the daemon finds it leaking (a median growth of at "
            "least 64 KiB per call, over at least 5 calls). false: only when asked, with "
            "`celery-memguard trace TASK`."
        ),
    )
    calls: int = Field(
        default=20, ge=1, le=1000,
        description=(
            "Calls of the task traced in the one child, each alone: the tracer runs from "
            "the task body's start to its return and what the call left is kept. The "
            "child's other tasks, and other children, are not traced."
        ),
    )
    frames: int = Field(
        default=10, ge=1, le=100,
        description=(
            "Frames kept per allocation: deeper call paths, and more of the tracer's memory "
            "per block the traced calls keep."
        ),
    )
    tool: Literal["tracemalloc", "memray"] = Field(
        default="tracemalloc",
        description=(
            "tracemalloc (standard library) sees Python's allocators only; memray (pip "
            "install celery-memguard[memray] in the worker's environment) also sees native "
            "allocations (C extensions, libraries), with native stacks."
        ),
    )
    cooldown: float = Field(
        default=3600.0,
        description="A task name traced automatically is not traced again for this long.",
    )
    timeout: float = Field(
        default=600.0,
        description=(
            "A child asked to trace has this long for its calls; then it stops and reports "
            "what it has. A child that ran none is replaced by another, while one is left."
        ),
    )
    dir: Path | None = Field(
        default=None,
        description=(
            "Where results are kept, one JSON file per trace, so that they outlive recycles "
            "and daemon restarts. Unset: the directory forensics/ beside agent.socket."
        ),
    )
    keep: int = Field(
        default=5, ge=1, le=1000, description="The newest results kept per task name."
    )

    @field_validator("cooldown", "timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        seconds = parse_duration(value)
        if not 1 <= seconds <= 7 * 86400:
            raise ValueError(f"must be between 1s and a week, got {value!r}")
        return seconds


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="json off a terminal, console on one, when auto."
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )


class WorkerLimits(_Section):
    match: str = Field(
        description="A shell pattern on the Celery nodename, e.g. 'reports@*'; the first match wins.",
    )
    limits: LimitsConfig = Field(
        description="Keys given here replace those of the top-level limits for matching workers.",
    )


class Config(_Section):
    agent: AgentConfig = Field(default_factory=AgentConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    workers: tuple[WorkerLimits, ...] = Field(
        default=(),
        description=(
            "Per-worker limits for hosts that run several workers: a list of {match, limits}; "
            "a worker that matches none uses the top-level limits."
        ),
    )
    recycle: RecycleConfig = Field(default_factory=RecycleConfig)
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    forensics: ForensicsConfig = Field(default_factory=ForensicsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    _document: dict[str, Any] = PrivateAttr(default_factory=dict)  # as written: limit_sources
    _socket_source: str = PrivateAttr(default="default")  # where agent.socket came from

    def __eq__(self, other: object) -> bool:
        """The same settings, however they were written (where they came from is not compared)."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    @property
    def socket_source(self) -> str:
        """Where agent.socket came from: the environment, the file, or the default."""
        return self._socket_source

    @property
    def forensics_dir(self) -> Path:
        """Where trace results are kept: forensics.dir, else forensics/ beside the socket."""
        return self.forensics.dir or self.agent.socket.parent / "forensics"

    def limits_for(self, worker: str) -> LimitsConfig:
        """The limits of the first ``workers`` entry whose pattern matches, else the top level."""
        entry = self._entry_for(worker)
        return self.workers[entry].limits if entry is not None else self.limits

    def _entry_for(self, worker: str) -> int | None:
        for n, entry in enumerate(self.workers):
            if fnmatch.fnmatchcase(worker, entry.match):
                return n
        return None

    def limit_sources(self, worker: str, memory: tuple[int, str]) -> dict[str, str]:
        """Where each limit in force for ``worker`` comes from, for ``doctor``: the key that set
        it (its ``workers`` entry, the top level) or the default, and what a percentage was
        taken of (``memory``: the total and its source, as the daemon found them)."""
        n = self._entry_for(worker)
        entries = self._document.get("workers")
        entry = entries[n] if n is not None and isinstance(entries, list) else {}
        own = entry.get("limits") if n is not None and isinstance(entry, dict) else None
        top = self._document.get("limits")
        sources = {}
        for key in _SOURCED_LIMITS:
            if isinstance(own, dict) and key in own:
                pattern = self.workers[n or 0].match
                where, raw = f"workers[{n}] (match {pattern!r}) limits.{key}", own[key]
            elif isinstance(top, dict) and key in top:
                where, raw = f"limits.{key}", top[key]
            else:
                sources[key] = "default"
                continue
            if isinstance(raw, str) and raw.strip().endswith("%"):
                where += (f" = {raw.strip()} of the container's limit" if key.startswith("container")
                          else f" = {raw.strip()} of {format_bytes(memory[0])} ({memory[1]} memory "
                               f"as the daemon sees it)")
            sources[key] = where
        return sources


class LimitsByName:
    """A config's limits and their sources per worker name, each looked up once: a tick asks
    for every child's."""

    MAX_NAMES = 4096

    def __init__(self, config: Config, memory: tuple[int, str]) -> None:
        self.config, self.memory = config, memory
        self._limits: dict[str, LimitsConfig] = {}
        self._sources: dict[str, dict[str, str]] = {}

    def limits(self, worker: str) -> LimitsConfig:
        found = self._limits.get(worker)
        if found is None:
            if len(self._limits) > self.MAX_NAMES:
                self._limits.clear()
            found = self._limits[worker] = self.config.limits_for(worker)
        return found

    def sources(self, worker: str) -> dict[str, str]:
        found = self._sources.get(worker)
        if found is None:
            if len(self._sources) > self.MAX_NAMES:
                self._sources.clear()
            found = self._sources[worker] = self.config.limit_sources(worker, self.memory)
        return found


_SOURCED_LIMITS = ("soft", "hard", "worker_total", "container_soft", "container_hard")


def split_listen(value: str) -> tuple[str, int]:
    """Return (host, port) from ``host:port`` or ``[v6]:port``; raise ValueError if unusable."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1..65535")
    if host in ("", "*"):
        return "0.0.0.0", port  # noqa: S104 - the user asked for every address
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not an IP address or 'localhost'") from None
    return host, port


def parse(data: object, memory_total: int | None = None, env: dict[str, str] | None = None) -> Config:
    """Validate a decoded YAML document; the socket env variable overrides ``agent.socket``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("<top>", f"expected a mapping of sections, got {type(data).__name__}")
    written = data
    data = _inherit_limits(data)
    try:
        config = Config.model_validate(data, context={"memory_total": memory_total})
    except ValidationError as exc:
        raise _first_error(exc) from None
    config._document = written
    override = (os.environ if env is None else env).get(SOCKET_ENV)
    config._socket_source = "agent.socket" if "socket" in (data.get("agent") or {}) else "default"
    if override:
        config = config.model_copy(
            update={"agent": config.agent.model_copy(update={"socket": Path(override)})}
        )
        config._socket_source = f"the environment variable {SOCKET_ENV}"
    return config


def _inherit_limits(data: dict[str, Any]) -> dict[str, Any]:
    """Each workers[].limits starts from the top-level limits: only the keys it names differ."""
    workers, base = data.get("workers"), data.get("limits") or {}
    if not isinstance(workers, list) or not isinstance(base, dict):
        return data
    merged = [
        {**entry, "limits": {**base, **entry["limits"]}}
        if isinstance(entry, dict) and isinstance(entry.get("limits"), dict) else entry
        for entry in workers
    ]
    return {**data, "workers": merged}


def load(path: str | os.PathLike[str], memory_total: int | None = None,
         env: dict[str, str] | None = None) -> Config:
    """Read and validate a YAML file; every failure is a ConfigError naming where."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("<yaml>", f"not valid YAML{where}: {problem}") from None
    return parse(data, memory_total=memory_total, env=env)


def _first_error(exc: ValidationError) -> ConfigError:
    error: dict[str, Any] = dict(exc.errors()[0])
    key = ".".join(str(part) for part in error["loc"]) or "<top>"
    if error["type"] == "extra_forbidden":
        return ConfigError(key, "unknown key (a typo would silently disable a setting)")
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    return ConfigError(key, message)

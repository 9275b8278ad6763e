"""What the agent and the daemon share, standard library only.

``messages`` (the datagrams agents send), ``settings`` (the file the daemon publishes for every
child), ``grants`` (the per-worker file through which a child recycles itself), ``rules`` (the
thresholds both sides must compute alike), ``paths`` and ``signals`` (where they meet and the
signal numbers they use). Neither side's code lives here.
"""

import sys

from celery_memguard.cli import main

sys.exit(main())

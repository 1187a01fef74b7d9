import sys

from trainer.plan.command import main

sys.exit(main())

"""The ground floor: what a launched process needs before, and beneath, everything else.

Nothing here imports the rest of the package (``config.base`` for ``ConfigError`` aside) or torch
at module level, so every floor may import it and the entry scripts load it before torch.

    lifecycle.py    where this process is in its life (start-up, training, finishing, failing)
    signals.py      SIGTERM/SIGINT over that life, and the deepspeed runner's exit
    phases.py       named start-up phases and the watchdog that reports a long one
    procfs.py       /proc read: a process's command line, its parent, who has a file open
    workers.py      DataLoader workers deaf to the signals the trainer takes
    build_locks.py  a wait on torch's JIT-build lock reported with the lock's holder
    launch_env.py   ranks and the rendezvous address from whatever launcher started the process
"""

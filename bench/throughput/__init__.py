"""The parts of ``bench/train_throughput.py`` (Lightning vs plain PyTorch, and the GPU matrix), one concern each.

- ``probes``: memory, CPU seconds and load average; :class:`~throughput.probes.Clock`, the step timer;
- ``run_info``: date, command, git state, versions and CPU of a run;
- ``config``: the composed training config and the bench's trainer limits; the options both scripts share;
- ``plain_loop``: the plain PyTorch arm's parts and loops (also the model-only figure of data_throughput.py);
- ``arms``: the two CPU arms (each a worker process) and one round of a config;
- ``summary``: median ratios over the rounds, against the target;
- ``workers``: starting, watching and stopping the worker processes; the GPU worker's progress events;
- ``gpu_cells``: the GPU matrix's cells and the worker that measures them;
- ``gpu_schedule``: the matrix over worker processes within the budget;
- ``markdown_report``: the markdown, the gpu-check block of docs/PERFORMANCE.md and the JSON.

Imported as ``throughput`` with bench/ on ``sys.path``, as the scripts beside it put it there.
"""

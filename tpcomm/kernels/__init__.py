"""Triton kernels of the GPU backend: device code and thin launchers, nothing else.

Naming grammar, for files and kernels alike: ``<collective>_<algorithm>[_<mechanism>]``.

- collective: ``all_reduce``, ``reduce_scatter``, ``all_gather``, ``barrier``.
- algorithm:  ``one_shot`` (every rank gets every rank's data and reduces all of it),
              ``two_shot`` (rank r reduces slice r, then every rank gathers the slices),
              ``ring`` (partial sums travel rank r -> r+1, then the results travel on).
- mechanism:  ``push`` (each rank stores its data straight into the peers' receive buffers and
              the data carries its own flag: a slot still holding the sentinel, all bits one, has
              not arrived; see ``_lamport.py``) or ``pull`` (each rank reads the peers' buffers
              after a signal-pad barrier, see ``barrier.py``).

So ``all_reduce_one_shot.py`` holds ``_all_reduce_one_shot_push_kernel`` and
``_all_reduce_one_shot_pull_kernel``. Files with a leading underscore hold device helpers shared
by the ops. None of these modules touches a process group, an environment variable or the
Communicator: they take addresses, sizes and ranks, and launch.

Kernels that take ``rank`` do not specialize on it (``do_not_specialize``): Triton would
otherwise compile a binary of its own for rank 1 (its ``== 1`` specialization). With one binary
for every rank, ranks share the compile cache, and ranks emulated in one process never load a
new module while a peer's kernel spins (a module load waits for the running kernels, so that
would stall until the timeout).

Importing this package does not import Triton; importing one of its modules does.
"""

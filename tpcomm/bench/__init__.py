"""``tpcomm bench``: nccl-tests-style sweeps of the collectives against other backends.

cli (arguments -> config), runner (what each rank does), backends (what is compared),
report (tables, markdown, JSON), plot (--plot), progress (the bar), meta (the header's facts).
"""

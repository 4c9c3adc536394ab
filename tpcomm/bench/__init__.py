"""``tpcomm bench``: nccl-tests-style sweeps of the collectives against other contenders.

cli (arguments -> config), runner (what each rank does), contenders (what is compared),
report (tables, markdown, JSON), plot (--plot), progress (the bar), meta (the header's facts).
"""

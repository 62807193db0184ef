"""Measurements beside the library, each behind a `launch/` entry point:

measurements   every stage of Stage A on this machine (launch.bench)
original       the original PyTorch step timed beside ours (used by both benches)
cache_formats  the token-cache build rate of one text in several formats (launch.bench_formats)
device_check   the accelerator check: launcher, kernels, the original's GPU recipe
               (launch.device_check)
"""

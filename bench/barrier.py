"""python -m bench.barrier: what one step's barrier costs on this GPU: cooperative groups'
grid.sync(), the persistent kernel's own bounded grid barrier on a counter
(csrc/persistent/grid_barrier.cuh, what the kernel uses), both in a cooperative launch, the
hardware barrier of a thread-block cluster (sm_90), and the cluster plans' exchange (each CTA
pushes 16 bytes into every peer and waits on its mbarrier for theirs: the CostModel's
dsmem_ns; and 4 KB into every peer, whose extra time gives the SM-to-SM bandwidth, the
CostModel's dsmem_bytes_per_ns; with one CTA per SM, as the persistent kernels run, so that
every push crosses the SM-to-SM network), in clusters of 2 to 16 CTAs, as many as run at once,
as microseconds per barrier (median of runs of many barriers, the launch included and spread
over them; the 4 KB rows run a quarter as many, so a launch weighs a little more in them)."""

import argparse
import statistics

import torch

from rnnfused import _C


PAYLOAD = 4096  # bytes into each peer in the bandwidth rows
CLUSTERS = (2, 4, 8, 16)


def measure(kind, ctas, cluster, iterations, runs, payload=16):
    _C.barrier_microseconds(kind, ctas, cluster, iterations, payload)  # warm-up
    return statistics.median(_C.barrier_microseconds(kind, ctas, cluster, iterations, payload) for _ in range(runs))


def pushed_bytes_per_ns(cluster, small_us, large_us, payload=PAYLOAD):
    """What one CTA pushes per nanosecond beyond the 16-byte exchange: (cluster - 1) peers'
    payloads less the 16 bytes each, over the extra time."""
    extra_ns = (large_us - small_us) * 1e3
    return (cluster - 1) * (payload - 16) / extra_ns if extra_ns > 0 else float("inf")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.barrier", description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000, help="barriers per launch (default %(default)s)")
    parser.add_argument("--runs", type=int, default=9, help="launches to take the median of (default %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not hasattr(_C, "barrier_microseconds"):
        raise SystemExit("bench.barrier needs a CUDA device and a build with the CUDA kernels")
    properties = torch.cuda.get_device_properties(0)
    sms = properties.multi_processor_count
    print(f"{torch.cuda.get_device_name()}: {sms} SMs; us per barrier (launch included), "
          f"{args.iterations} barriers per launch")
    print(f"{'barrier':<10}{'CTAs':>6}{'cluster':>9}{'payload':>9}{'us':>9}{'B/ns/CTA':>10}")
    print(f"{'grid':<10}{sms:>6}{'-':>9}{'-':>9}{measure('grid', sms, 1, args.iterations, args.runs):>9.3f}")
    print(f"{'counter':<10}{sms:>6}{'-':>9}{'-':>9}{measure('counter', sms, 1, args.iterations, args.runs):>9.3f}")
    if (properties.major, properties.minor) >= (9, 0):
        def clusters_of(kind, cluster, payload=16):
            """As many whole clusters as the SMs hold and the GPU runs at once (the exchange: one
            CTA per SM; 16 CTAs is sm_90's largest, not portable)."""
            return min(sms // cluster, _C.co_resident_clusters(kind, cluster, payload)) * cluster

        for cluster in CLUSTERS:
            ctas = clusters_of("cluster", cluster)
            us = measure("cluster", ctas, cluster, args.iterations, args.runs) if ctas else float("nan")
            print(f"{'cluster':<10}{ctas:>6}{cluster:>9}{'-':>9}{us:>9.3f}")
        for cluster in CLUSTERS:
            ctas = clusters_of("exchange", cluster, PAYLOAD)
            if not ctas:
                print(f"{'exchange':<10}{0:>6}{cluster:>9}   (no cluster of this size fits)")
                continue
            small = measure("exchange", ctas, cluster, args.iterations, args.runs)
            large = measure("exchange", ctas, cluster, max(1, args.iterations // 4), args.runs, PAYLOAD)
            print(f"{'exchange':<10}{ctas:>6}{cluster:>9}{16:>9}{small:>9.3f}")
            print(f"{'exchange':<10}{ctas:>6}{cluster:>9}{PAYLOAD:>9}{large:>9.3f}"
                  f"{pushed_bytes_per_ns(cluster, small, large):>10.1f}")
    else:
        print("cluster barriers need compute capability 9.0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

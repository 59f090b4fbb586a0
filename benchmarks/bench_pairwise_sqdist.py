from benchmarks._harness import bench_op

test_bench_pairwise_sqdist = bench_op("pairwise_sqdist")

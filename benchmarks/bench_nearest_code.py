from benchmarks._harness import bench_op

test_bench_nearest_code = bench_op("nearest_code")

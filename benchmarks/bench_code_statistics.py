from benchmarks._harness import bench_op

test_bench_code_statistics = bench_op("code_statistics")

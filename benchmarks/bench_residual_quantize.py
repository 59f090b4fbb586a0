from benchmarks._harness import bench_op

test_bench_residual_quantize = bench_op("residual_quantize")

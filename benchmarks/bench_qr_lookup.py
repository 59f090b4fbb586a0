from benchmarks._harness import bench_op

test_bench_qr_lookup = bench_op("qr_lookup")

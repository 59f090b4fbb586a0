from benchmarks._harness import bench_op

test_bench_rotation_trick = bench_op("rotation_trick")

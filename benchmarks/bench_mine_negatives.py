from benchmarks._harness import bench_op

test_bench_mine_negatives = bench_op("mine_negatives")

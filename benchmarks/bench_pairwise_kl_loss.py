from benchmarks._harness import bench_op

test_bench_pairwise_kl_loss = bench_op("pairwise_kl_loss")

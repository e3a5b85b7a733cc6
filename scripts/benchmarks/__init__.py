"""The questions `scripts/benchmark.py` answers, one module each, on one shared clock (`timing`).

* `throughput`: training images/s of our pipeline vs the torchvision reference vs the model alone;
* `layouts`: the model alone in NCHW / channels_last x fp32 / bf16 autocast;
* `evaluation`: one test-split evaluation per test-time augmentation and evaluation batch;
* `tracking_overhead`: `train_model` with MLflow vs the same training without it;
* `graphs`, `compiled`: the step eager vs as CUDA graphs, and vs torch.compile'd;
* `norm_kernels`: one norm layer alone, and batch norm's step over ghost batches.

Every step, epoch and evaluation they time is a norm's recipe built by `train`'s own builder
(`recipe`: `training.build_model` + `training.build_training`).
"""

"""The tiny demo configuration the train.py tests share: 10 + 6 synthetic identities, 64x32
images, ResNet-18 CMFN, 2 iterations of 4 ids x 2 images per epoch, no workers."""

BASE = {
    "DATASET.DEMO_TRAIN_IDS": 10, "DATASET.DEMO_TEST_IDS": 6,
    "INPUT.SIZE_TRAIN": "[64,32]", "INPUT.SIZE_TEST": "[64,32]",
    "DATALOADER.NUM_IDS": 4, "DATALOADER.NUM_POS": 2, "DATALOADER.NUM_WORKERS": 0,
    "SOLVER.ITERS_PER_EPOCH": 2, "SOLVER.MAX_EPOCHS": 1, "SOLVER.WARMUP_EPOCHS": 1,
    "SOLVER.BASE_LR": 0.01, "SOLVER.LOG_PERIOD": 1, "SOLVER.EVAL_BEFORE_TRAIN": False,
    "TEST.NUM_TRIALS": 1, "TEST.BATCH_SIZE": 64,
}


def tiny_opts(data_root, out_dir, **extra):
    """KEY VALUE overrides for train.py: BASE, then `extra`."""
    opts = {"OUTPUT_DIR": out_dir, "DATASET.ROOT": data_root}
    opts.update(BASE)
    opts.update(extra)
    return [str(x) for kv in opts.items() for x in kv]

from easydict import EasyDict as edict

# FastFace (Gong et al., 2024): one GPU, batch 128, lr 0.02, 5 epochs.
# torchrun --nproc_per_node=1 train_v2.py configs/wf12m_r100_fastface.py

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.02
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/WebFace12M"
config.num_classes = 617970
config.num_image = 12720066
config.num_epoch = 5
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.lr_scheduler = "fastface"
config.fastface = dict(alpha=1e-3, beta=1e-3, threshold=5e-5, tolerance=0.05, decay=2.0, max_decays=8)

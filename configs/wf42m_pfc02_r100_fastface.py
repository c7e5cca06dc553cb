from easydict import EasyDict as edict

# The host's wf42m_pfc02_r100 recipe with the FastFace scheduler and 5 epochs instead of 20.
# torchrun --nproc_per_node=8 train_v2.py configs/wf42m_pfc02_r100_fastface.py

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 10000
config.dali = False

config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 5
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.lr_scheduler = "fastface"
config.fastface = dict(alpha=1e-3, beta=1e-3, threshold=5e-5, tolerance=0.05, decay=2.0, max_decays=8)

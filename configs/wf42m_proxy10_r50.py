from easydict import EasyDict as edict

# Face-NMS step 1: the proxy model, trained on a 10% per-identity sample of WebFace42M.
#   python -m plugins.face_nms proxy-subset --rec /train_tmp/WebFace42M --ratio 0.1 \
#       --out /train_tmp/WebFace42M_proxy10.idx
#   torchrun --nproc_per_node=8 train_v2.py configs/wf42m_proxy10_r50.py

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r50"
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
config.num_image = 42474557  # replaced by the proxy subset's size at start
config.num_epoch = 4
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.dataset_filter = "face_nms"
config.face_nms = dict(index="/train_tmp/WebFace42M_proxy10.idx")

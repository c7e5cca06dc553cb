from easydict import EasyDict as edict

# One GPU, batch 128, lr 0.02 (as wf12m_r100_fastface) on the 60% Face-NMS core set of WebFace12M, 5 epochs:
# 0.6 x 5/20 = 15% of the face-epochs of the host's 20-epoch wf12m_r100 recipe (38M of 254M face passes), plus one
# forward pass over the 12.7M faces for selection. The proxy model is that of configs/wf42m_proxy10_r50.py.
#   python -m plugins.face_nms extract --rec /train_tmp/WebFace12M --checkpoint work_dirs/wf42m_proxy10_r50/model.pt \
#       --network r50 --out /train_tmp/WebFace12M_features
#   python -m plugins.face_nms select --features /train_tmp/WebFace12M_features --rec /train_tmp/WebFace12M --ratio 0.6 \
#       --out /train_tmp/WebFace12M_facenms60.idx
#   torchrun --nproc_per_node=1 train_v2.py configs/wf12m_r100_facenms60_fastface.py

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
config.num_image = 12720066  # replaced by the core set's size at start
config.num_epoch = 5
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.dataset_filter = "face_nms"
config.face_nms = dict(index="/train_tmp/WebFace12M_facenms60.idx")

config.lr_scheduler = "fastface"
config.fastface = dict(alpha=1e-3, beta=1e-3, threshold=5e-5, tolerance=0.05, decay=2.0, max_decays=8)

from easydict import EasyDict as edict

# The host's ms1mv3_r100 recipe trained on the 60% Face-NMS core set.
#   python -m plugins.face_nms extract --rec /train_tmp/ms1m-retinaface-t1 --checkpoint work_dirs/wf42m_proxy10_r50/model.pt \
#       --network r50 --out /train_tmp/ms1m-retinaface-t1_features
#   python -m plugins.face_nms select --features /train_tmp/ms1m-retinaface-t1_features --rec /train_tmp/ms1m-retinaface-t1 --ratio 0.6 \
#       --out /train_tmp/ms1m-retinaface-t1_facenms60.idx
#   torchrun --nproc_per_node=8 train_v2.py configs/ms1mv3_r100_facenms60.py

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False

config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510  # replaced by the core set's size at start
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.dataset_filter = "face_nms"
config.face_nms = dict(index="/train_tmp/ms1m-retinaface-t1_facenms60.idx")

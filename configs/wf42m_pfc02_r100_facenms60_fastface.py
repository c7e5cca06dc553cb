from easydict import EasyDict as edict

# The host's wf42m_pfc02_r100 recipe on the 60% Face-NMS core set with the FastFace scheduler and 5 epochs
# instead of 20: 0.6 x 5/20 = 15% of the host recipe's face-epochs (127M of 849M face passes), plus the
# proxy model's training (configs/wf42m_proxy10_r50.py) and one forward pass over the 42.5M faces for selection.
#   python -m plugins.face_nms proxy-subset --rec /train_tmp/WebFace42M --ratio 0.1 \
#       --out /train_tmp/WebFace42M_proxy10.idx
#   torchrun --nproc_per_node=8 train_v2.py configs/wf42m_proxy10_r50.py
#   python -m plugins.face_nms extract --rec /train_tmp/WebFace42M --checkpoint work_dirs/wf42m_proxy10_r50/model.pt \
#       --network r50 --out /train_tmp/WebFace42M_features
#   python -m plugins.face_nms select --features /train_tmp/WebFace42M_features --rec /train_tmp/WebFace42M --ratio 0.6 \
#       --out /train_tmp/WebFace42M_facenms60.idx
#   torchrun --nproc_per_node=8 train_v2.py configs/wf42m_pfc02_r100_facenms60_fastface.py

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
config.num_image = 42474557  # replaced by the core set's size at start
config.num_epoch = 5
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.dataset_filter = "face_nms"
config.face_nms = dict(index="/train_tmp/WebFace42M_facenms60.idx")

config.lr_scheduler = "fastface"
config.fastface = dict(alpha=1e-3, beta=1e-3, threshold=5e-5, tolerance=0.05, decay=2.0, max_decays=8)

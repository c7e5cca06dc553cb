from easydict import EasyDict as edict

# The wf42m_pfc02_r100_facenms60 recipe for WebFace42M as distributed: an image folder, one sub-folder
# per identity (the host reads config.rec with torchvision's ImageFolder when it holds no train.rec +
# train.idx). The core set is a .txt of image paths relative to the folder.
#   python -m plugins.face_nms proxy-subset --rec /train_tmp/WebFace42M_images --ratio 0.1 \
#       --out /train_tmp/WebFace42M_images_proxy10.txt
#   python -m plugins.face_nms extract --rec /train_tmp/WebFace42M_images --checkpoint work_dirs/wf42m_proxy10_r50/model.pt \
#       --network r50 --out /train_tmp/WebFace42M_images_features
#   python -m plugins.face_nms select --features /train_tmp/WebFace42M_images_features --rec /train_tmp/WebFace42M_images \
#       --ratio 0.6 --out /train_tmp/WebFace42M_images_facenms60.txt
#   torchrun --nproc_per_node=8 train_v2.py configs/wf42m_folder_r100_facenms60.py

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
config.dali = False  # DALI reads RecordIO only

config.rec = "/train_tmp/WebFace42M_images"
config.num_classes = 2059906
config.num_image = 42474557  # replaced by the core set's size at start
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]

config.dataset_filter = "face_nms"
config.face_nms = dict(index="/train_tmp/WebFace42M_images_facenms60.txt")

set -e
cd /work/main
common=(--image_size 128 --channel_mult 1,2,3,4 --num_channels 32 --num_res_blocks 1 --num_heads 1
  --attention_resolutions 16 --learn_sigma True --use_scale_shift_norm False
  --diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False
  --predict_xstart True --x0_loss_weight 1
  --crop_border 0 --resize_to 128 --batch_size 16 --lr 1e-3 --ema_rate 0.999
  --lr_schedule cosine --warmup_steps 200 --grad_clip 1.0 --tumour_fraction 0.7
  --precision bf16 --channels_last --augment --seed 0
  --save_interval 250 --log_interval 25 --sample_respacing 10
  --objective diffusion --norm_groups 8
  --init_from runs/cont/B/model.pt --click_fraction 0.5 --lr 3e-4 --warmup_steps 50
  --augment_intensity --augment_spatial --threads 1 --seed 1 --max_minutes 0 --max_steps 700)
which=$1
if [ "$which" = all ]; then
  data=(--data_dir runs/all12/data --val_dir "")
else
  data=(--data_dir runs/demo/split/train --val_dir runs/demo/split/val)
fi
R=()
[ -f runs/all12/$which/checkpoint.pt ] && R=(--resume runs/all12/$which/checkpoint.pt)
.venv/bin/python -m napari_diffseg.train "${data[@]}" "${common[@]}" --out_dir runs/all12/$which "${R[@]}"

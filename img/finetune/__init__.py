"""MLLM fine-tuning on instruction-edit triplets: teach the MLLM to name what is wrong with an image.

    img data sample --kind edits --out data/edits --pairs 400 --seed 0
    img jobs finetune-mllm --profile tiny --data data/edits --steps 200 --run-dir runs/ft --lake lake
    img jobs embed --dataset pickapic --source data/sample --profile tiny --lake lake2 --mllm-adapter runs/ft/adapter

Modules: ``edits`` (shapes-world edits and their instructions), ``edit_sample`` (the
InstructPix2Pix-layout sample writer), ``data`` (reading, validation, the rank-sharded
loader), ``adapter`` (adapter identity, loading and merging), ``train`` (the DeepSpeed job).
"""

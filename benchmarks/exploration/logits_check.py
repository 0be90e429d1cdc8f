"""Logits of the reference ViT (first 256 test images) and of tiny random HF towers, under quickmerge.patch with
several settings; written to argv[1] (torch.save) so two checkouts can be compared."""
import sys

import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit

torch.set_num_threads(1)
out = {}
model = load_fashion_vit().eval()
images = normalize(load_fashion_mnist("test")[0][:256])
settings = {"r=16": dict(r=16), "r=48": dict(r=48), "tome r=16": dict(r=16, method="tome"),
            "tome r=48": dict(r=48, method="tome"), "greedy ratio=0.25": dict(ratio=0.25, matching="greedy"),
            "scaled r=32": dict(r=32, saliency_rule="scaled"), "random r=16": dict(r=16, method="random", seed=0),
            "pool r=16": dict(r=16, method="pool"), "no prop_attn r=32": dict(r=32, prop_attn=False),
            "hidden eps=0.5 r=32": dict(r=32, similarity="hidden", epsilon=0.5)}
with torch.no_grad():
    for name, s in settings.items():
        with quickmerge.patch(model, **s):
            out[name] = model(images)
import transformers  # noqa: E402

for cls, cfg in (("ViTForImageClassification", transformers.ViTConfig), ("CLIPVisionModel", transformers.CLIPVisionConfig),
                 ("SiglipVisionModel", transformers.SiglipVisionConfig), ("Dinov2Model", transformers.Dinov2Config)):
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        m = getattr(transformers, cls)(cfg(image_size=16, patch_size=2, num_channels=3, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            attn_implementation=impl)).eval()
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for s in (dict(r=0), dict(r=12), dict(r=12, method="tome")):
                with quickmerge.patch(m, **s):
                    o = m(pixel_values=x)
                out[f"{cls} {impl} {s}"] = o.logits if hasattr(o, "logits") else o.last_hidden_state
# heads that pool every patch token (stop 62): timm ViT and Eva reset to average after the final norm, OpenCLIP's
# average pooling before and after ln_post; random weights, every unmerge
import open_clip.transformer as open_clip_transformer  # noqa: E402
import timm  # noqa: E402

x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
pooled = {}
torch.manual_seed(0)
pooled["timm avg"] = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10,
                                       init_values=0.1, reg_tokens=1)
pooled["timm avg"].reset_classifier(10, global_pool="avg")
torch.manual_seed(0)
pooled["eva avg"] = timm.models.eva.Eva(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                                       init_values=0.1, use_rot_pos_emb=True)
pooled["eva avg"].reset_classifier(10, global_pool="avg")
for after in (False, True):
    torch.manual_seed(0)
    pooled[f"openclip avg ln_after_pool={after}"] = open_clip_transformer.VisionTransformer(
        image_size=32, patch_size=4, width=64, layers=4, heads=4, mlp_ratio=2.0, output_dim=24, ls_init_value=0.1,
        pool_type="avg", final_ln_after_pool=after)
with torch.no_grad():
    for name, m in pooled.items():
        m.eval()
        for s in (dict(r=12), dict(r=12, method="tome"), dict(r=12, unmerge="copy"), dict(r=12, method="random")):
            with quickmerge.patch(m, **s):
                out[f"{name} {s}"] = m(x)
torch.save(out, sys.argv[1])
print(len(out), "settings")

# Development / test harness for comfyui-lipschitz-personalize (GNU make).
PY ?= python3
VENV = .venv
VPY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
MODELS = .comfyui/models
TINY_SD15 = $(MODELS)/tiny_sd15.safetensors
TINY_SDXL = $(MODELS)/tiny_sdxl.safetensors
TINY_ENC = $(MODELS)/eval/tiny-clip.safetensors
FULL_SD15 = $(MODELS)/fullsize_sd15_fp16.safetensors
MICROWORLD = $(MODELS)/microworld_sd15.safetensors
MW_WEIGHTS = tools/microworld/weights

export PYTHONUNBUFFERED = 1

.PHONY: venv comfyui tiny-ckpt tiny-encoders fullsize-ckpt microworld browser-deps test demo

venv: $(STAMP)

# Works for a venv created by hand too: the stamp is missing, so the (idempotent) installs run once.
$(STAMP): constraints.txt requirements-dev.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -qq -c constraints.txt torch==2.15.0 torchvision==0.29.2
	$(VPY) -m pip install -qq -r requirements-dev.txt -c constraints.txt
	touch $@

comfyui: venv
	$(VPY) tools/setup_comfyui.py

tiny-ckpt: $(TINY_SD15) $(TINY_SDXL)

# Tiny random CLIP and DINO encoders for the metric nodes (tests, demo), also linked under the
# names the bundled workflows load (clip-vit-base-patch32, dino-vits16).
tiny-encoders: $(TINY_ENC)

$(TINY_ENC): | $(STAMP) comfyui
	$(VPY) tools/make_tiny_encoders.py --out $(MODELS)/eval --names-of-real-models

$(TINY_SD15): | $(STAMP)
	$(VPY) tools/make_tiny_checkpoint.py --out $@ --arch sd15

$(TINY_SDXL): | $(STAMP)
	$(VPY) tools/make_tiny_checkpoint.py --out $@ --arch sdxl

# The micro-world (docs/microworld.md): its SD1.5-layout checkpoint assembled from the committed
# U-Net and VAE weights plus the regenerated text encoder, and its evaluation CLIP in models/eval.
microworld: $(MICROWORLD)

$(MICROWORLD): $(MW_WEIGHTS)/unet.safetensors $(MW_WEIGHTS)/vae.safetensors tools/microworld/text_encoder.py | $(STAMP) comfyui
	$(VPY) tools/microworld/build.py --out $@ --eval-dir $(MODELS)/eval

# The full-size SD1.5 stand-in (random weights, 2.1 GB, the fp16 file's layout) for
# tests/test_fullsize.py; `--arch sd15-full` writes the 4.3 GB fp32 one.
fullsize-ckpt: $(FULL_SD15)

$(FULL_SD15): | $(STAMP)
	$(VPY) tools/make_tiny_checkpoint.py --out $@ --arch sd15-full-fp16

# Debian's chromium for tests/test_browser.py (playwright drives it; no `playwright install`).
browser-deps:
	test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test: venv comfyui tiny-ckpt tiny-encoders fullsize-ckpt microworld browser-deps
	$(VPY) -m pytest -q

demo: venv comfyui $(TINY_SD15) $(TINY_ENC) $(MICROWORLD)
	$(VPY) tools/demo.py $(if $(CKPT),--ckpt $(CKPT))

# Benchmarks (docs/performance.md). bench: CPU suite, one JSON line per figure, recorded in
# docs/bench_cpu.json and rendered into README.md and docs/performance.md.
# bench-gpu: the memory modes on the full-size SD1.5 U-Net at 512 px on CUDA (BENCH_ARGS="--caps"
# also finds the smallest card each fits); exits non-zero without a CUDA device.
.PHONY: bench bench-gpu bench-fullsize
bench: venv comfyui tiny-ckpt
	$(VPY) tools/bench.py $(BENCH_ARGS)

# bench-fullsize: the full-size SD1.5 U-Net (random weights) on CPU: disk figures; needs ~14 GB RAM.
bench-fullsize: venv comfyui
	$(VPY) tools/bench_fullsize.py

bench-gpu: venv comfyui
	$(VPY) tools/bench_gpu.py $(BENCH_ARGS)

# The paper's DreamBooth benchmark on diffusers (tools/benchmark; docs/benchmark.md): make benchmark ARGS="--model SD15_DIR --clip CLIP_DIR --dino DINO_DIR
# --lambdas 0 500 [--ray [--ray-address ADDR]]". benchmark-smoke: tiny random models written
# under output/benchmark_smoke/models, subjects dog and can, lambdas 0 and 500, a few steps,
# through a local Ray on the CPU. BENCH_DATA: the DreamBooth folder (prompts_and_classes.txt).
BENCH_DATA ?= ../shared/datasets/dreambooth512
BENCH_OUT ?= output/benchmark
.PHONY: benchmark benchmark-smoke
benchmark: venv
	$(VPY) -m tools.benchmark --data $(BENCH_DATA) --out $(BENCH_OUT) $(ARGS)

benchmark-smoke: venv comfyui
	$(VPY) -m tools.benchmark --smoke --ray --data $(BENCH_DATA) --lambdas 0 500 --out output/benchmark_smoke $(ARGS)

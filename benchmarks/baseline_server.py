"""Baseline OpenAI-compatible LoRA server on plain transformers + PEFT, for benchmarks only.

This is NOT part of loraserve. It is the naive way people serve many LoRA adapters, kept
deliberately simple so benchmarks have a fair, recognisable peer:

* the base model is loaded with transformers and wrapped with PEFT (``PeftModel.from_pretrained``
  for the first adapter, ``load_adapter`` for the rest);
* a background thread takes every queued request (up to ``--max-batch``) and runs them together as
  ONE STATIC BATCH: left-padded prefill, then a manual decode loop over the HF KV cache
  (``past_key_values``), with PEFT's mixed-adapter batching (``adapter_names=[...]`` per row,
  ``"__base__"`` for the base model), streaming each step's token to its request;
* requests that arrive while a batch runs wait for the next batch (static batching: the baseline's
  known weakness); finished rows keep being computed until the whole batch ends, silently.

    python benchmarks/baseline_server.py --model DIR --adapter NAME=PATH ... \
        [--port 8001] [--dtype float32] [--max-batch 32] [--served-name NAME]

Serves GET /health, GET /v1/models, POST /v1/completions (prompt: text or token ids; max_tokens;
temperature 0 = greedy, else temperature/top_p sampling; ignore_eos; stream true/false).
"""
import argparse, asyncio, json, os, queue, threading, time, uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class Req:
    def __init__(self, ids, adapter, max_tokens, temperature, top_p, ignore_eos, loop):
        self.ids, self.adapter, self.max_tokens = ids, adapter, max_tokens
        self.temperature, self.top_p, self.ignore_eos = temperature, top_p, ignore_eos
        self.loop, self.out = loop, asyncio.Queue()  # items: token id (int) or ("end", reason|Exception)

    def push(self, item):
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Engine:
    def __init__(self, args):
        dtype = getattr(torch, args.dtype)
        self.tok = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        adapters = [a.split("=", 1) for a in args.adapter]
        self.model = base
        for i, (name, path) in enumerate(adapters):
            if i == 0:
                self.model = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.adapters = [n for n, _ in adapters]
        eos = base.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.eos, default=0)
        self.max_len = getattr(base.config, "max_position_embeddings", 1 << 30)
        self.max_batch, self.queue = args.max_batch, queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            batch = [self.queue.get()]  # block for the first, then take all that are waiting
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                with torch.inference_mode():
                    self._run(batch)
            except Exception as e:  # report to every request of the batch, keep serving
                for r in batch:
                    r.push(("end", e))

    def _run(self, batch):
        n, width = len(batch), max(len(r.ids) for r in batch)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {}
        if self.adapters:
            kw["adapter_names"] = [r.adapter or "__base__" for r in batch]
        temps = torch.tensor([r.temperature for r in batch], dtype=torch.float32)
        top_p = torch.tensor([r.top_p for r in batch], dtype=torch.float32).unsqueeze(1)
        greedy = temps <= 0
        done, count, past = [False] * n, [0] * n, None
        for _ in range(max(r.max_tokens for r in batch)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=past, use_cache=True, **kw)
            past, logits = out.past_key_values, out.logits[:, -1, :].float()
            nxt = logits.argmax(-1)
            if not greedy.all():
                probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), -1)
                sp, si = probs.sort(-1, descending=True)
                sp[(sp.cumsum(-1) - sp) > top_p] = 0  # nucleus: keep the smallest prefix >= top_p
                pick = si.gather(1, torch.multinomial(sp, 1)).squeeze(1)
                nxt = torch.where(greedy, nxt, pick)
            for i, r in enumerate(batch):
                if done[i]:
                    continue  # finished rows are still computed, but no longer streamed
                t = int(nxt[i])
                count[i] += 1
                r.push(t)
                if not r.ignore_eos and t in self.eos:
                    done[i] = True
                    r.push(("end", "stop"))
                elif count[i] >= r.max_tokens:
                    done[i] = True
                    r.push(("end", "length"))
            if all(done):
                break
            ids, pos = nxt.unsqueeze(1), pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)


def build_app(engine, served_name):
    app = FastAPI(title="baseline transformers+PEFT server (benchmark peer, not loraserve)")
    base_names = {served_name, "base"}

    def err(status, msg, typ="invalid_request_error"):
        return JSONResponse({"error": {"message": msg, "type": typ, "code": status}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        names = [served_name] + engine.adapters
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "baseline",
                                            "parent": None if m == served_name else served_name} for m in names]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except Exception:
            return err(400, "body must be JSON")
        model = body.get("model")
        if model in engine.adapters:
            adapter = model
        elif model in base_names:
            adapter = None
        else:
            return err(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a list holding one prompt
        if isinstance(prompt, str):
            ids = engine.tok(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            return err(400, "prompt: one string or one list of token ids")
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(1.0 if body.get("temperature") is None else body["temperature"])
        top_p = float(1.0 if body.get("top_p") is None else body["top_p"])
        if not ids or max_tokens < 1 or len(ids) + max_tokens > engine.max_len:
            return err(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) must fit in {engine.max_len}")
        r = Req(ids, adapter, max_tokens, temperature, top_p, bool(body.get("ignore_eos", False)),
                asyncio.get_running_loop())
        engine.queue.put(r)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text, reason, usage=None):
            d = {"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
            if usage is not None:
                d["usage"] = usage
            return d

        async def tokens():  # yields (text delta, finish_reason or None); raises on engine error
            out, sent = [], ""
            while True:
                item = await r.out.get()
                if isinstance(item, tuple):
                    if isinstance(item[1], Exception):
                        raise item[1]
                    rest = engine.tok.decode(out, skip_special_tokens=True)[len(sent):]
                    yield rest, item[1], len(out)
                    return
                out.append(item)
                text = engine.tok.decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
                    delta, sent = text[len(sent):], text
                    if delta:
                        yield delta, None, len(out)

        def usage(n_out):
            return {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}

        if body.get("stream"):
            async def sse():
                try:
                    async for delta, reason, n_out in tokens():
                        yield f"data: {json.dumps(chunk(delta, reason))}\n\n"
                        if reason and usage_in_stream:
                            yield f"data: {json.dumps(dict(chunk('', None), choices=[], usage=usage(n_out)))}\n\n"
                except Exception as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'InternalError'}})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        text, reason, n_out = "", None, 0
        try:
            async for delta, reason, n_out in tokens():
                text += delta
        except Exception as e:
            return err(500, str(e), "InternalError")
        return chunk(text, reason, usage(n_out))

    return app


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="PEFT adapter (repeatable)")
    p.add_argument("--served-name", "--served-model-name", dest="served_name", default=None,
                   help="the base model's API name (default: the model directory name; 'base' always works)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", type=int, default=32, help="requests per static batch")
    args = p.parse_args()
    engine = Engine(args)
    served = args.served_name or os.path.basename(os.path.normpath(args.model))
    uvicorn.run(build_app(engine, served), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

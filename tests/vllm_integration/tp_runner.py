"""Run one vLLM generation with tensor parallelism in a fresh process (TP workers are separate
processes; they find the plugin through the ``vllm.general_plugins`` entry point).

    python tp_runner.py MODEL_DIR DTYPE TP OUT_JSON PROMPTS_JSON MAX_TOKENS
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    model_dir, dtype, tp, out_path, prompts_json, max_tokens = sys.argv[1:7]
    from ascend_quant.vllm_integration import register

    register()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, quantization="ascend", dtype=dtype, enforce_eager=True, max_model_len=128,
              max_num_seqs=4, seed=0, tensor_parallel_size=int(tp), distributed_executor_backend="mp")
    outs = llm.generate(json.loads(prompts_json), SamplingParams(max_tokens=int(max_tokens), temperature=0.0,
                                                                 logprobs=0), use_tqdm=False)
    gens = []
    for o in outs:
        c = o.outputs[0]
        toks = list(c.token_ids)
        gens.append({"prompt_ids": list(o.prompt_token_ids), "token_ids": toks,
                     "logprobs": [c.logprobs[i][t].logprob for i, t in enumerate(toks)], "text": c.text})
    with open(out_path, "w") as f:
        json.dump(gens, f)


if __name__ == "__main__":
    main()

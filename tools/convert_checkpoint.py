#!/usr/bin/env python
"""Move checkpoints between layouts, or export the release format.

    # any (TP, PP, ZeRO) training checkpoint -> one consolidated fp32 safetensors file + config JSON
    python tools/convert_checkpoint.py --load runs/ckpt --output-consolidated release/model

    # a training checkpoint -> a checkpoint for another (TP, PP), optimizer state included
    python tools/convert_checkpoint.py --load runs/ckpt --save runs/ckpt_tp4 --target-tp 4 --target-pp 1
    # (Megatron-LM's names work too: --target-tensor-parallel-size, --target-pipeline-parallel-size)

    # a consolidated file -> a checkpoint to start training from (fresh optimizer)
    python tools/convert_checkpoint.py --load release/model.safetensors --save runs/init --target-tp 2

    # a fairseq transformer_lm checkpoint -> a checkpoint to train on (fresh optimizer); with
    # --fairseq-dict its vocabulary rows are reordered to GPT-2 BPE ids (docs/interop.md)
    python tools/convert_checkpoint.py --load checkpoint_best.pt --fairseq-dict data-bin/dict.txt \
        --save runs/from_fairseq --target-tp 2 --target-pp 2

    # anything above -> a Hugging Face transformers directory (remote code, or a native Llama or
    # GPT-2 where the layout is theirs), with the tokenizer as a fast tokenizer; and such a
    # directory (or any transformers Llama / GPT-2) back
    python tools/convert_checkpoint.py --load runs/ckpt --output-hf hf/model \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/sp.model
    python tools/convert_checkpoint.py --load hf/model --save runs/from_hf --target-tp 2

``pretrain_gpt.py --load`` also resumes a training checkpoint in a different layout directly; the
re-sharded copy saves every rank from reading the full tensors at start-up.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_normformer.config import ConfigError  # noqa: E402
from megatron_normformer.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="A training checkpoint directory (its 'latest' tag), a consolidated "
                             ".safetensors file, a Hugging Face directory (an --output-hf export or "
                             "a GPT-2), or a fairseq transformer_lm checkpoint (.pt).")
    parser.add_argument("--tag", default=None, help="Checkpoint tag to read instead of 'latest'.")
    parser.add_argument("--fairseq-dict", default=None, metavar="DICT_TXT",
                        help="fairseq's GPT-2 dict.txt of a fairseq --load: reorder the vocabulary "
                             "rows so that GPT2BPETokenizer ids index them (fairseq's </s> becomes "
                             "the end-of-document id). Without it fairseq's indices are kept and "
                             "its dict.txt (found beside the checkpoint or in its task's data "
                             "directory) is copied beside the output.")
    parser.add_argument("--output-consolidated", default=None, metavar="PATH",
                        help="Write PATH.safetensors (full fp32 tensors) and PATH.json (model config).")
    parser.add_argument("--save", default=None, help="Write a checkpoint for --target-tp/--target-pp here.")
    hf = parser.add_argument_group("Hugging Face export (docs/interop.md)")
    hf.add_argument("--output-hf", default=None, metavar="DIR",
                    help="Write a transformers directory: config, weights, modeling code, tokenizer.")
    hf.add_argument("--hf-native", action=argparse.BooleanOptionalAction, default=None,
                    help="Export as a native LlamaForCausalLM or GPT2LMHeadModel (no remote "
                         "code); by default that happens exactly when the model's layout is "
                         "Llama's or GPT-2's.")
    hf.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                    help="The model's tokenizer, exported as a fast tokenizer (none: no tokenizer).")
    hf.add_argument("--tokenizer-model", help="SentencePiece .model or HF tokenizer.json")
    hf.add_argument("--vocab-file", help="GPT-2 vocab.json")
    hf.add_argument("--merge-file", help="GPT-2 merges.txt")
    parser.add_argument("--target-tensor-parallel-size", "--target-tp", dest="target_tp", type=int,
                        default=1, help="Tensor-parallel degree of --save (Megatron-LM's name, or "
                                        "--target-tp).")
    parser.add_argument("--target-pipeline-parallel-size", "--target-pp", dest="target_pp", type=int,
                        default=1, help="Pipeline-parallel degree of --save (Megatron-LM's name, or "
                                        "--target-pp).")
    return parser


def from_fairseq(args) -> None:
    """--load of a fairseq transformer_lm checkpoint: a consolidated file, or a checkpoint to
    train on; its dictionary (when fairseq's indices are kept) copied beside either."""
    import shutil

    from megatron_normformer.checkpoint.convert import from_full_state
    from megatron_normformer.checkpoint.release import save_consolidated
    from megatron_normformer.interop.fairseq import continuation_flags, import_fairseq

    imported = import_fairseq(args.load, args.fairseq_dict)
    for note in imported.notes:
        print(f"note: {note}")
    if args.output_consolidated:
        written = save_consolidated(args.output_consolidated, imported.full, imported.cfg)
        dictionary = written[: -len(".safetensors")] + ".dict.txt"
        print(f"wrote {written} and its config JSON")
    else:
        tag = from_full_state(imported.full, imported.cfg, args.save, args.target_tp, args.target_pp)
        dictionary = os.path.join(args.save, "dict.txt")
        print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp} (fresh optimizer)")
    if imported.dictionary:
        shutil.copyfile(imported.dictionary, dictionary)
        print(f"copied fairseq's dictionary {imported.dictionary} to {dictionary}")
    if args.save:
        tokenizer = ("--tokenizer-type GPT2BPETokenizer --vocab-file VOCAB.json --merge-file MERGES.txt"
                     if args.fairseq_dict else f"--vocab-size {imported.cfg.vocab_size}")
        print(f"train on with: pretrain_gpt.py --load {args.save} --finetune {tokenizer} "
              + " ".join(continuation_flags(imported.cfg)))


def to_hf(args) -> None:
    """--output-hf: any --load as a transformers directory, with its tokenizer when named."""
    from megatron_normformer.checkpoint.inference import load_full_state
    from megatron_normformer.data.tokenizers import build_tokenizer
    from megatron_normformer.inference.cli import check_tokenizer
    from megatron_normformer.interop.hf import export_hf
    from megatron_normformer.interop.hf_tokenizer import TokenizerFiles

    full, cfg = load_full_state(args.load, args.tag, args.fairseq_dict)
    tokenizer, files = None, None
    if args.tokenizer_type:
        files = TokenizerFiles(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                    args.merge_file, cfg.vocab_size)
        check_tokenizer(tokenizer, cfg)
    done = export_hf(full, cfg, args.output_hf, tokenizer, files, args.hf_native)
    kind = f"a native {done.native}" if done.native else "NormFormer remote code (trust_remote_code=True)"
    print(f"wrote {args.output_hf}: {kind}")
    if done.special_tokens is None:
        why = "a NullTokenizer's ids are the text" if tokenizer else "no --tokenizer-type given"
        print(f"no tokenizer written ({why})")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(map(bool, (args.output_consolidated, args.save, args.output_hf))) != 1:
        parser.error("give exactly one of --output-consolidated, --save and --output-hf")
    if not args.output_hf and (args.tokenizer_type or args.hf_native is not None):
        parser.error("--tokenizer-type and --hf-native go with --output-hf")
    if args.target_tp < 1 or args.target_pp < 1:
        parser.error("--target-tp and --target-pp must be positive")

    from megatron_normformer.checkpoint import convert as cc
    from megatron_normformer.checkpoint.atomic import CheckpointError
    from megatron_normformer.interop.hf import is_hf_directory, load_hf_directory

    consolidated_input = args.load.endswith(".safetensors") or os.path.isfile(args.load + ".safetensors")
    fairseq_input = not consolidated_input and os.path.isfile(args.load)
    if args.fairseq_dict and not fairseq_input:
        parser.error("--fairseq-dict goes with --load of a fairseq checkpoint file")
    hf_input = is_hf_directory(args.load)
    try:
        if args.output_hf:
            to_hf(args)
        elif hf_input:
            full, cfg = load_hf_directory(args.load)
            if args.output_consolidated:
                from megatron_normformer.checkpoint.release import save_consolidated

                print(f"wrote {save_consolidated(args.output_consolidated, full, cfg)} and its config JSON")
            else:
                from megatron_normformer.interop.fairseq import continuation_flags

                tag = cc.from_full_state(full, cfg, args.save, args.target_tp, args.target_pp)
                print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp} "
                      "(fresh optimizer)")
                tokenizer = os.path.join(args.load, "tokenizer.json")
                tokenizer = (f"--tokenizer-type HFTokenizer --tokenizer-model {tokenizer}"
                             if os.path.isfile(tokenizer) else f"--vocab-size {cfg.vocab_size}")
                script = "pretrain_bert.py" if cfg.bidirectional else "pretrain_gpt.py"
                print(f"train on with: {script} --load {args.save} --finetune {tokenizer} "
                      + " ".join(continuation_flags(cfg)))
        elif fairseq_input:
            from_fairseq(args)
        elif args.output_consolidated:
            if consolidated_input:
                parser.error("--load is already a consolidated file")
            path = cc.to_consolidated(args.load, args.output_consolidated, args.tag)
            print(f"wrote {path} and its config JSON")
        elif consolidated_input:
            tag = cc.from_consolidated(args.load, args.save, args.target_tp, args.target_pp)
            print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp} (fresh optimizer)")
        else:
            tag = cc.reshard(args.load, args.save, args.target_tp, args.target_pp, args.tag)
            print(f"wrote {args.save}/{tag} for TP={args.target_tp}, PP={args.target_pp}")
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except CheckpointError as e:  # a write that failed (a full disk): nothing half-written is left
        parser.exit(1, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()

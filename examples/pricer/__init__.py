"""The product pricer: read a description, answer its price (the course's running example).

    from pricer import load_source, split_items, greedy_prices, score, save_scatter
    loaded = load_source(None)                       # the embedded diamonds
    split = split_items(loaded.items, seed=DEMO_SEED, test_size=200, val_size=64)   # the demo's split
    guesses, _ = greedy_prices(model, tokenizer, [item.prompt for item in split.test])
    report = score(guesses, [item.price for item in split.test])
    print(report.title())                            # Error=$… RMSLE=… Hits=…%
"""
from .chat import (DiamondChat, answer_budget, evaluate_chat_prices, load_diamond_chats, price_answer,
                   write_chats_jsonl)
from .chart import log_to_tensorboard, save_scatter, scatter_figure
from .evaluate import answer_tokens, evaluate_greedy_and_top_k, evaluate_prices, load_model, print_report, resolve_device, results_table
from .data import (
    DESCRIPTIONS,
    Item,
    Loaded,
    describe_diamond,
    describe_four_cs,
    diamond_rows,
    diamonds_csv,
    load_amazon_meta,
    load_diamonds,
    load_source,
    load_text_price,
    scrub,
)
from .split import Split, adapter_split, held_out, shuffled, split_items, split_record
from .metrics import GREEN, ORANGE, RED, PriceReport, color_for, constant_baseline, parse_price, score
from .predict import chat_replies, end_of_turn_ids, greedy_and_top_k_prices, greedy_prices, top_k_average_prices
from .recipe import (ALL_PROJECTIONS, ATTENTION, CHAT_DEMO, DEMO_SEED, MLP, PRESETS, all_projections, base_dtype, compute_dtype,
                     lora_config, parse_layers, train_config)
from .prompt import PREFIX, QUESTION, make_answer, make_prompt
from .tuning import diamond_chat_pairs, diamond_chat_rows, price_reward
from .after import tune_after

__all__ = [
    "DESCRIPTIONS",
    "Item", "Loaded", "Split", "describe_diamond", "describe_four_cs", "diamond_rows", "diamonds_csv", "load_amazon_meta", "load_diamonds",
    "load_source", "load_text_price", "scrub", "shuffled", "split_items", "split_record", "held_out", "adapter_split",
    "GREEN", "ORANGE", "RED", "PriceReport", "color_for", "constant_baseline", "parse_price", "score",
    "greedy_prices", "top_k_average_prices", "greedy_and_top_k_prices", "chat_replies", "end_of_turn_ids",
    "DiamondChat", "answer_budget", "evaluate_chat_prices", "load_diamond_chats", "price_answer", "write_chats_jsonl", "PREFIX", "QUESTION", "make_answer", "make_prompt",
    "save_scatter", "scatter_figure", "log_to_tensorboard",
    "ALL_PROJECTIONS", "ATTENTION", "CHAT_DEMO", "DEMO_SEED", "MLP", "PRESETS", "all_projections", "base_dtype", "compute_dtype", "lora_config",
    "parse_layers", "train_config",
    "diamond_chat_pairs", "diamond_chat_rows", "price_reward", "tune_after",
    "answer_tokens", "evaluate_prices", "evaluate_greedy_and_top_k", "load_model", "print_report", "resolve_device", "results_table",
]

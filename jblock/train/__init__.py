"""Training and experiments above the zoo: fine-tuning (finetune), LoRA adapters (lora_train),
the variant maker (variants), the demo zoo (demo, demo_corpus.txt) and the adaptive-assembly
Pareto sweep (pareto)."""

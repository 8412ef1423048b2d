"""The recipe of the shipped default model (moeflow/default_model): corpus, training, evaluation, model card.

    nice -n 10 python -m recipes.default_model.train --out moeflow/default_model --minutes 38
    python -m recipes.default_model.eval --model moeflow/default_model --json
"""

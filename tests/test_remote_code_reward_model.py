"""A custom-code (`trust_remote_code`) reward model whose output carries the reward in `score`, like ArmoRM."""

import importlib.util
import sys
import textwrap

import pytest
import torch
from conftest import build_tiny_llama, pointwise_rows
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from qrpo_trl import ReferenceConfig, precompute_rewards


# ArmoRM's interface in miniature: its own config and model classes, registered through `auto_map`, and an output
# with the reward in `score` (shape (batch, 1)) and no `logits`
MODELING = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaModel, PreTrainedModel
    from transformers.utils import ModelOutput


    class TinyScoreConfig(LlamaConfig):
        model_type = "tiny_score"


    @dataclass
    class TinyScoreOutput(ModelOutput):
        score: torch.FloatTensor = None


    class TinyScoreModel(PreTrainedModel):
        config_class = TinyScoreConfig

        def __init__(self, config):
            super().__init__(config)
            self.model = LlamaModel(config)
            self.head = nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kwargs):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            last = attention_mask.sum(dim=1) - 1
            return TinyScoreOutput(score=self.head(hidden[torch.arange(len(last)), last]))
''')


@pytest.fixture(scope="module")
def remote_code_reward_model_path(tmp_path_factory, tokenizer):
    source = tmp_path_factory.mktemp("source")
    (source / "modeling_tiny_score.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_score", source / "modeling_tiny_score.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_tiny_score"] = module
    spec.loader.exec_module(module)
    module.TinyScoreConfig.register_for_auto_class()
    module.TinyScoreModel.register_for_auto_class("AutoModelForSequenceClassification")
    config = module.TinyScoreConfig(**build_tiny_llama(tokenizer).config.to_diff_dict())
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("remote-code-reward-model")
    module.TinyScoreModel(config).save_pretrained(path)  # writes the modeling file and `auto_map`
    tokenizer.save_pretrained(path)
    del sys.modules["modeling_tiny_score"]
    return str(path)


def test_remote_code_reward_model_scores_from_score(remote_code_reward_model_path, tokenizer, tmp_path):
    rows = pointwise_rows()
    dataset = Dataset.from_dict({"prompt": rows["prompt"][:4], "completion": rows["completion"][:4]})
    args = ReferenceConfig(reward_model_trust_remote_code=True, reference_cache_dir=str(tmp_path / "cache"))
    scored = precompute_rewards(
        dataset, build_tiny_llama(tokenizer), remote_code_reward_model_path, args, processing_class=tokenizer,
        add_ref_rewards=False,
    )
    reward_model = AutoModelForSequenceClassification.from_pretrained(remote_code_reward_model_path, trust_remote_code=True)
    assert type(reward_model).__name__ == "TinyScoreModel"
    with torch.no_grad():
        for row in scored:
            inputs = tokenizer(text=row["prompt"] + row["completion"], return_tensors="pt", add_special_tokens=False)
            assert row["reward"] == pytest.approx(reward_model(**inputs).score[0, 0].item(), rel=1e-5)
    assert len(set(scored["reward"])) == 4


def test_remote_code_reward_model_needs_the_flag(remote_code_reward_model_path, tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["hello"], "completion": [" yes"]})
    args = ReferenceConfig(reference_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        precompute_rewards(
            dataset, build_tiny_llama(tokenizer), remote_code_reward_model_path, args, processing_class=tokenizer,
            add_ref_rewards=False,
        )

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.jsonrows import read_json_rows
from actors.states import StateDataError, check_states, read_states, training_rows, write_states

SYSTEM = "You switch between four thinking levels."


def raw_record(**overrides):
    record = {
        "dialog": ['Turn 0: Ana Silva said: "Hi Ben."\n', "Turn 1: Ben Okafor said:"],
        "env_id": 3,
        "turn": 1,
        "instruction": "Imagine you are Ben Okafor ...",
        "agent1_name": "Ana Silva",
        "agent2_name": "Ben Okafor",
        "agent1_goal": "Borrow the car",
        "agent2_goal": "Keep the car",
        "rollout": 2,
        "state": {"agent1": {"score": 4.0}, "agent2": {"score": 6.5}, "step": 1},
        "agent1_goal_score": 7.0,
    }
    record.update(overrides)
    return record


def test_raw_json_record_parses():
    state = read_states_from([raw_record()])[0]
    assert state.actor == 2 and state.state_id == "3:2:1"
    assert state.reward_context()["state_reward"] == {"agent1": {"score": 4.0}, "agent2": {"score": 6.5}}
    assert state.messages(SYSTEM)[0] == {"role": "system", "content": SYSTEM}


def test_round_trip_through_training_parquet(tmp_path):
    source = tmp_path / "raw.json"
    source.write_text(json.dumps([raw_record(), raw_record(env_id=4, turn=1)]))
    states = read_states(source)
    out = write_states(states, tmp_path / "train_rl.parquet", SYSTEM)
    back = read_states(out)
    assert [s.model_copy(update={"system_prompt": None}) for s in back] == states
    assert back[0].system_prompt == SYSTEM
    table = pq.read_table(out)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = table.to_pylist()[0]
    assert row["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert row["reward_model"]["state_reward"]["agent2"]["score"] == 6.5


def test_jsonl_and_parquet_raw_layouts(tmp_path):
    jsonl = tmp_path / "raw.jsonl"
    jsonl.write_text("\n".join(json.dumps(raw_record(env_id=i)) for i in range(3)))
    assert [s.env_id for s in read_states(jsonl)] == [0, 1, 2]
    parquet = tmp_path / "raw.parquet"
    pq.write_table(pa.Table.from_pylist([raw_record()]), parquet)
    assert read_states(parquet)[0].prior.agent2 == 6.5


@pytest.mark.parametrize(
    "bad, message",
    [
        (raw_record(state={"agent1": {"score": 11.0}, "agent2": {"score": 5.0}}), r"row 1: field 'state\.agent1\.score'.*less than or equal to 10"),
        (raw_record(state={"agent1": {"score": -1.0}, "agent2": {"score": 5.0}}), r"row 1: field 'state\.agent1\.score'"),
        ({k: v for k, v in raw_record().items() if k != "instruction"}, r"row 1: missing field 'instruction'"),
        (raw_record(turn="one"), r"row 1: field 'turn'.*valid integer"),
        (raw_record(dialog=['Turn 0: Ana said: "hi"\n']), r"row 1: field 'dialog'.*open slot"),
        (raw_record(turn=2), r"row 1: field 'record'.*turn 2 does not match"),
        ("not a record", r"row 1: expected a record"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad, message):
    path = tmp_path / "states.json"
    path.write_text(json.dumps([raw_record(), bad]))
    with pytest.raises(StateDataError, match=message):
        read_states(path)
    valid, errors = check_states(path)
    assert valid == 1 and len(errors) == 1 and str(path) in errors[0]


def test_unreadable_files(tmp_path):
    with pytest.raises(StateDataError, match="file not found"):
        read_states(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(StateDataError, match="not valid JSON"):
        read_states(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(raw_record()) + "\n{oops\n")
    with pytest.raises(StateDataError, match="line 2: not valid JSON"):
        read_states(lines)
    with pytest.raises(StateDataError, match="file not found"):
        read_states(tmp_path / "missing.parquet")


class RowsError(ValueError):
    """Stands for a caller's own error type."""


def test_json_rows_reader(tmp_path: Path) -> None:
    """The one reader of JSON-list and JSON-lines files: rows as parsed, errors in the caller's type naming the
    file and, for JSON lines, the line counted with blank lines."""
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps([{"a": 1}, "text", [2]]))
    assert read_json_rows(listed) == [{"a": 1}, "text", [2]]  # non-object rows are the caller's to report by index
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n   \n"text"\n')
    assert read_json_rows(lines) == [{"a": 1}, "text"]
    lines.write_text('{"a": 1}\n\n{"b": oops}\n')
    with pytest.raises(RowsError, match=re.escape(f"{lines}: line 3: not valid JSON: Expecting value (column 7)")):
        read_json_rows(lines, error=RowsError)
    listed.write_text('[{"a": 1},\n oops]')
    with pytest.raises(RowsError, match=re.escape(f"{listed}: not valid JSON: Expecting value at line 2 column 2")):
        read_json_rows(listed, error=RowsError)
    listed.write_text('{"a": 1}')
    with pytest.raises(RowsError, match=re.escape(f"{listed}: expected a JSON list of widgets, got dict")):
        read_json_rows(listed, error=RowsError, what="widgets")
    listed.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(RowsError, match=re.escape(f"{listed}: not UTF-8 text:")):
        read_json_rows(listed, error=RowsError)
    with pytest.raises(RowsError, match=re.escape(f"{tmp_path / 'missing.jsonl'}: file not found")):
        read_json_rows(tmp_path / "missing.jsonl", error=RowsError)


def test_training_rows_carry_index_and_messages():
    state = read_states_from([raw_record()])[0]
    row = training_rows([state], SYSTEM)[0]
    assert row["extra_info"] == {"split": "train", "index": 0, "env_id": 3, "turn": 1, "rollout": 2}
    assert row["prompt"][1] == {"role": "user", "content": state.instruction}


def read_states_from(records):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.json"
        path.write_text(json.dumps(records))
        return read_states(path)


def _states_with_instructions(*instructions: str, system: str | None = None):
    from actors.sotopia import SotopiaDataset
    from actors.states import make_state

    dataset = SotopiaDataset.load()
    return [make_state(dataset, 0, [], (5.0, 5.0)).model_copy(update={"instruction": text, "system_prompt": system})
            for text in instructions]


def test_states_whose_templated_prompt_is_too_long_are_dropped_and_counted():
    from actors.states import fit_states

    def characters(messages):  # a counter whose lengths are easy to check by hand
        return sum(len(m["content"]) for m in messages)

    states = _states_with_instructions("a" * 10, "b" * 30, "c" * 21)
    kept, dropped = fit_states(states, characters, max_prompt_tokens=25, default_system_prompt="sys")
    # 3 + 10 = 13 and 3 + 21 = 24 fit; 3 + 30 = 33 does not; the order is kept.
    assert [s.instruction[0] for s in kept] == ["a", "c"] and dropped == 1
    # A state's own system prompt counts instead of the default.
    own = _states_with_instructions("a" * 10, system="x" * 20)
    assert fit_states(own, characters, max_prompt_tokens=25, default_system_prompt="sys") == ([], 1)


def test_the_token_counter_is_the_policy_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.states import chat_token_counter

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Turn 0: speak."}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = len(tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"])
    assert chat_token_counter(tiny_model_dir)(messages) == expected

from spm.tokenizer import VOCAB_SIZE, clip_tokenizer, find_bpe_file


def test_vocab_size_and_reference_ids(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_padding_sd1_and_sd2():
    assert clip_tokenizer()("cat", padding="max_length", max_length=5).input_ids == [49406, 2368, 49407, 49407, 49407]
    assert clip_tokenizer("!")("cat", padding="max_length", max_length=5).input_ids == [49406, 2368, 49407, 0, 0]


def test_vocabulary_found_without_importing_open_clip():
    import sys

    assert find_bpe_file().name == "bpe_simple_vocab_16e6.txt.gz"
    assert "open_clip" not in sys.modules

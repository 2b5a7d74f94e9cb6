from pretrain.data import detokenizers as d


def test_wikitext():
    raw = ' = Valkyria Chronicles III = \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : ' \
          '戦場のヴァルキュリア3 ) , is a 1 @,@ 000 @-@ year @.@ 5 game . It \'s " good " . \n'
    assert d.wikitext(raw) == (
        ' = Valkyria Chronicles III =\nSenjō no Valkyria 3: <unk> Chronicles (Japanese: '
        '戦場のヴァルキュリア3), is a 1,000-year.5 game. It\'s "good".\n')
    assert d.for_dataset("wikitext2") is d.wikitext and d.for_dataset("wikitext103") is d.wikitext


def test_ptb():
    raw = "the company 's chief said N shares ca n't fall $ N \\/ share <unk> \n "
    assert d.ptb(raw) == "the company's chief said 1 shares can't fall $1 / share ?\n"
    assert d.for_dataset("ptb") is d.ptb


def test_lm1b():
    raw = 'He said , " it \'s over " ( see http : / / x.com ) and left .'
    assert d.lm1b(raw) == 'He said, "it\'s over" (see http://x.com) and left.'
    assert d.lm1b("Why ? Because !") == "Why? Because!"
    assert d.for_dataset("lm1b") is d.lm1b


def test_lambada():
    assert d.lambada("  “Quoted” text.  ") == '\n"Quoted" text.'
    assert d.for_dataset("lambada") is d.lambada


def test_scientific_papers_applies_both():
    raw = "we use 1 @,@ 000 samples , see ( fig . 1 ) ."
    # a period after a bracket keeps its space: neither detokenizer has a rule for it
    assert d.scientific_papers(raw) == "we use 1,000 samples, see (fig. 1) ."
    assert d.for_dataset("scientific_papers_arxiv") is d.scientific_papers
    assert d.for_dataset("openwebtext") is None and d.for_dataset("ag_news") is None

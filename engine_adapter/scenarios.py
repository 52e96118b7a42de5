"""Deterministic scenario content for prefix-caching tests (generated once, frozen as literals)."""

SYSTEM_PROMPT = ('You are a careful research assistant. Answer questions using only the briefing document provided by the '
 'user. Answer in one or two sentences.')

DOCUMENT = ('The Quillmere Archipelago is a fictional chain of six islands in a cold northern sea. This briefing '
 'collects what is known about its towns, its history and its customs. The islands are Great Quill, Little '
 'Quill, Sorrel Isle, the Tern Rocks, Marrow Key and Ashcairn. The capital is Harrowgate, on Great Quill, '
 'and the official currency is the quill mark, divided into twelve pennies.\n'
 '\n'
 'Towns of the archipelago.\n'
 '\n'
 'Harrowgate is a stubborn town on Great Quill, founded in the year 1419 according to the harbour rolls. Its '
 'population at the last census was 4633, most of whom work in the making of blue salt or in the trade of '
 'amber glass. The town is best known for its 2 bell towers, which were rebuilt after a fire on the orders '
 'of Chancellor Edrin Toll. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Tuesday at dawn. The council of Harrowgate meets in a hall built '
 'of driftwood, and its records go back 384 years.\n'
 '\n'
 'Velmar is a busy town on Ashcairn, founded in the year 1426 according to the harbour rolls. Its population '
 'at the last census was 952, most of whom work in the making of amber glass or in the trade of wool '
 'blankets. The town is best known for its 4 bell towers, which were rebuilt after a fire on the orders of '
 'the cartographer Piet Moresby. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Monday at dawn. The council of Velmar meets in a hall built of '
 'grey granite, and its records go back 183 years.\n'
 '\n'
 'Ostrend is a lively town on the Tern Rocks, founded in the year 1456 according to the harbour rolls. Its '
 'population at the last census was 330, most of whom work in the making of wool blankets or in the trade of '
 'slate tiles. The town is best known for its 9 bell towers, which were rebuilt after a fire on the orders '
 'of the engineer Hal Brannock. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Thursday at dawn. The council of Ostrend meets in a hall built of '
 'white limestone, and its records go back 206 years.\n'
 '\n'
 'Caddis Bay is a crowded town on the Tern Rocks, founded in the year 1470 according to the harbour rolls. '
 'Its population at the last census was 7633, most of whom work in the making of amber glass or in the trade '
 'of wool blankets. The town is best known for its 10 bell towers, which were rebuilt after a fire on the '
 'orders of the engineer Hal Brannock. Visitors arriving by ferry are greeted by a stone arch carved with '
 'the town motto, and the local market opens every Tuesday at dawn. The council of Caddis Bay meets in a '
 'hall built of white limestone, and its records go back 108 years.\n'
 '\n'
 'Lunewick is a stubborn town on the Tern Rocks, founded in the year 1504 according to the harbour rolls. '
 'Its population at the last census was 642, most of whom work in the making of slate tiles or in the trade '
 'of copper bells. The town is best known for its 12 bell towers, which were rebuilt after a fire on the '
 'orders of the cartographer Piet Moresby. Visitors arriving by ferry are greeted by a stone arch carved '
 'with the town motto, and the local market opens every Saturday at dawn. The council of Lunewick meets in a '
 'hall built of white limestone, and its records go back 249 years.\n'
 '\n'
 'Saltmere is a quiet town on Ashcairn, founded in the year 1516 according to the harbour rolls. Its '
 'population at the last census was 1772, most of whom work in the making of dried figs or in the trade of '
 'blue salt. The town is best known for its 13 bell towers, which were rebuilt after a fire on the orders of '
 'the poet Marit Caskey. Visitors arriving by ferry are greeted by a stone arch carved with the town motto, '
 'and the local market opens every Thursday at dawn. The council of Saltmere meets in a hall built of red '
 'brick, and its records go back 346 years.\n'
 '\n'
 'Brindlecombe is a stubborn town on Little Quill, founded in the year 1538 according to the harbour rolls. '
 'Its population at the last census was 4569, most of whom work in the making of kelp paper or in the trade '
 'of tin lanterns. The town is best known for its 14 bell towers, which were rebuilt after a fire on the '
 'orders of Chancellor Edrin Toll. Visitors arriving by ferry are greeted by a stone arch carved with the '
 'town motto, and the local market opens every Saturday at dawn. The council of Brindlecombe meets in a hall '
 'built of grey granite, and its records go back 362 years.\n'
 '\n'
 'Tarrow Point is a busy town on Great Quill, founded in the year 1565 according to the harbour rolls. Its '
 'population at the last census was 1295, most of whom work in the making of wool blankets or in the trade '
 'of slate tiles. The town is best known for its 6 bell towers, which were rebuilt after a fire on the '
 'orders of the merchant Jory Fenn. Visitors arriving by ferry are greeted by a stone arch carved with the '
 'town motto, and the local market opens every Tuesday at dawn. The council of Tarrow Point meets in a hall '
 'built of grey granite, and its records go back 202 years.\n'
 '\n'
 'Emberhold is a windswept town on Great Quill, founded in the year 1594 according to the harbour rolls. Its '
 'population at the last census was 4756, most of whom work in the making of pickled samphire or in the '
 'trade of rope. The town is best known for its 5 bell towers, which were rebuilt after a fire on the orders '
 'of the poet Marit Caskey. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Tuesday at dawn. The council of Emberhold meets in a hall built of '
 'white limestone, and its records go back 394 years.\n'
 '\n'
 'Quessing is a remote town on Great Quill, founded in the year 1620 according to the harbour rolls. Its '
 'population at the last census was 2623, most of whom work in the making of wool blankets or in the trade '
 'of dried figs. The town is best known for its 13 bell towers, which were rebuilt after a fire on the '
 'orders of Admiral Orla Vance. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Saturday at dawn. The council of Quessing meets in a hall built of '
 'driftwood, and its records go back 116 years.\n'
 '\n'
 'Dunmoral is a stubborn town on Great Quill, founded in the year 1642 according to the harbour rolls. Its '
 'population at the last census was 5053, most of whom work in the making of smoked eel or in the trade of '
 'wool blankets. The town is best known for its 4 bell towers, which were rebuilt after a fire on the orders '
 'of the engineer Hal Brannock. Visitors arriving by ferry are greeted by a stone arch carved with the town '
 'motto, and the local market opens every Tuesday at dawn. The council of Dunmoral meets in a hall built of '
 'driftwood, and its records go back 155 years.\n'
 '\n'
 'Ferrowick is a lively town on Sorrel Isle, founded in the year 1666 according to the harbour rolls. Its '
 'population at the last census was 7909, most of whom work in the making of amber glass or in the trade of '
 'dried figs. The town is best known for its 3 bell towers, which were rebuilt after a fire on the orders of '
 'the poet Marit Caskey. Visitors arriving by ferry are greeted by a stone arch carved with the town motto, '
 'and the local market opens every Monday at dawn. The council of Ferrowick meets in a hall built of white '
 'limestone, and its records go back 373 years.\n'
 '\n'
 'Notable events.\n'
 '\n'
 'The Lantern Accord took place in 1515. It began in Lunewick when the astronomer Ilse Warrow drafted a '
 'proposal concerning slate tiles. Within 10 months the dispute had spread to Caddis Bay, where the poet '
 'Marit Caskey negotiated a settlement that lasted 32 years. Historians of the archipelago still argue about '
 'whether the outcome strengthened or weakened the council, but most agree that it changed the price of '
 'smoked eel for a generation.\n'
 '\n'
 'The Great Storm took place in 1540. It began in Caddis Bay when the poet Marit Caskey drafted a proposal '
 'concerning rope. Within 7 months the dispute had spread to Ostrend, where the astronomer Ilse Warrow '
 'negotiated a settlement that lasted 36 years. Historians of the archipelago still argue about whether the '
 'outcome strengthened or weakened the council, but most agree that it changed the price of rope for a '
 'generation.\n'
 '\n'
 'The Salt Strike took place in 1587. It began in Caddis Bay when the merchant Jory Fenn refused to sign a '
 'proposal concerning amber glass. Within 11 months the dispute had spread to Harrowgate, where Admiral Orla '
 'Vance negotiated a settlement that lasted 29 years. Historians of the archipelago still argue about '
 'whether the outcome strengthened or weakened the council, but most agree that it changed the price of '
 'amber glass for a generation.\n'
 '\n'
 'The Founding of the Tide College took place in 1612. It began in Emberhold when Chancellor Edrin Toll '
 'drafted a proposal concerning copper bells. Within 2 months the dispute had spread to Tarrow Point, where '
 'the engineer Hal Brannock negotiated a settlement that lasted 19 years. Historians of the archipelago '
 'still argue about whether the outcome strengthened or weakened the council, but most agree that it changed '
 'the price of slate tiles for a generation.\n'
 '\n'
 'The Bridge Charter took place in 1643. It began in Tarrow Point when the astronomer Ilse Warrow refused to '
 'sign a proposal concerning kelp paper. Within 10 months the dispute had spread to Ostrend, where the '
 'cartographer Piet Moresby negotiated a settlement that lasted 47 years. Historians of the archipelago '
 'still argue about whether the outcome strengthened or weakened the council, but most agree that it changed '
 'the price of kelp paper for a generation.\n'
 '\n'
 'The Second Census took place in 1668. It began in Harrowgate when the poet Marit Caskey drafted a proposal '
 'concerning wool blankets. Within 4 months the dispute had spread to Dunmoral, where the engineer Hal '
 'Brannock negotiated a settlement that lasted 35 years. Historians of the archipelago still argue about '
 'whether the outcome strengthened or weakened the council, but most agree that it changed the price of wool '
 'blankets for a generation.\n'
 '\n'
 'The Kelp Blight took place in 1711. It began in Dunmoral when the botanist Sela Ruane refused to sign a '
 'proposal concerning kelp paper. Within 7 months the dispute had spread to Ostrend, where Admiral Orla '
 'Vance negotiated a settlement that lasted 31 years. Historians of the archipelago still argue about '
 'whether the outcome strengthened or weakened the council, but most agree that it changed the price of wool '
 'blankets for a generation.\n'
 '\n'
 'The Harbour Fire took place in 1720. It began in Tarrow Point when the astronomer Ilse Warrow quietly '
 'funded a proposal concerning wool blankets. Within 7 months the dispute had spread to Saltmere, where '
 'Chancellor Edrin Toll negotiated a settlement that lasted 39 years. Historians of the archipelago still '
 'argue about whether the outcome strengthened or weakened the council, but most agree that it changed the '
 'price of blue salt for a generation.\n'
 '\n'
 'Trade routes.\n'
 '\n'
 'The route between Brindlecombe and Quessing carries mostly amber glass. Ships make the crossing in 6 days '
 'in good weather, and the harbour masters of both towns keep a joint ledger that records 120 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Quessing and Lunewick carries mostly kelp paper. Ships make the crossing in 4 days in '
 'good weather, and the harbour masters of both towns keep a joint ledger that records 202 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Brindlecombe and Velmar carries mostly seal-oil soap. Ships make the crossing in 6 days '
 'in good weather, and the harbour masters of both towns keep a joint ledger that records 164 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Dunmoral and Brindlecombe carries mostly slate tiles. Ships make the crossing in 4 days '
 'in good weather, and the harbour masters of both towns keep a joint ledger that records 175 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Lunewick and Ferrowick carries mostly blue salt. Ships make the crossing in 4 days in '
 'good weather, and the harbour masters of both towns keep a joint ledger that records 313 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Tarrow Point and Ferrowick carries mostly dried figs. Ships make the crossing in 3 days '
 'in good weather, and the harbour masters of both towns keep a joint ledger that records 205 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Emberhold and Dunmoral carries mostly slate tiles. Ships make the crossing in 5 days in '
 'good weather, and the harbour masters of both towns keep a joint ledger that records 198 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'The route between Harrowgate and Dunmoral carries mostly dried figs. Ships make the crossing in 1 days in '
 'good weather, and the harbour masters of both towns keep a joint ledger that records 76 sailings in an '
 'average year. Tolls on the route are set each spring by the council in Harrowgate and are paid in quill '
 'marks.\n'
 '\n'
 'Customs and daily life.\n'
 '\n'
 'In Ostrend, it is customary to give a gift of kelp paper at weddings, a habit said to have started with '
 'Admiral Orla Vance. Children learn 8 traditional sea songs before the age of ten, and the largest festival '
 'of the year, held in midwinter, lasts 7 days and ends with a procession of lanterns along the harbour '
 'wall.\n'
 '\n'
 'In Lunewick, it is customary to give a gift of kelp paper at weddings, a habit said to have started with '
 'the botanist Sela Ruane. Children learn 7 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in midsummer, lasts 6 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Ferrowick, it is customary to give a gift of wool blankets at weddings, a habit said to have started '
 'with the poet Marit Caskey. Children learn 3 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in midsummer, lasts 2 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Velmar, it is customary to give a gift of slate tiles at weddings, a habit said to have started with '
 'the merchant Jory Fenn. Children learn 3 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in spring, lasts 8 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Ostrend, it is customary to give a gift of amber glass at weddings, a habit said to have started with '
 'the engineer Hal Brannock. Children learn 8 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in midwinter, lasts 4 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Quessing, it is customary to give a gift of slate tiles at weddings, a habit said to have started with '
 'Queen Ysolde the Second. Children learn 8 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in spring, lasts 5 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Dunmoral, it is customary to give a gift of wool blankets at weddings, a habit said to have started '
 'with the cartographer Piet Moresby. Children learn 9 traditional sea songs before the age of ten, and the '
 'largest festival of the year, held in midwinter, lasts 5 days and ends with a procession of lanterns along '
 'the harbour wall.\n'
 '\n'
 'In Emberhold, it is customary to give a gift of slate tiles at weddings, a habit said to have started with '
 'the astronomer Ilse Warrow. Children learn 5 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in midwinter, lasts 8 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Tarrow Point, it is customary to give a gift of smoked eel at weddings, a habit said to have started '
 'with the merchant Jory Fenn. Children learn 5 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in midwinter, lasts 6 days and ends with a procession of lanterns along the '
 'harbour wall.\n'
 '\n'
 'In Quessing, it is customary to give a gift of smoked eel at weddings, a habit said to have started with '
 'the physician Tobiah Crane. Children learn 6 traditional sea songs before the age of ten, and the largest '
 'festival of the year, held in spring, lasts 4 days and ends with a procession of lanterns along the '
 'harbour wall.')

DOC_QUESTIONS = ['According to the briefing, what is the capital of the Quillmere Archipelago and on which island is it?',
 'What is the official currency of the archipelago, and how is it divided?',
 'Which town is described first in the list of towns, and what is its population?']

CHAT_TURNS = ["Hi! I'm planning a small vegetable garden on my balcony. What should I grow first?",
 'My balcony gets about four hours of sun in the afternoon. Does that change your advice?',
 'Great. How often should I water tomatoes in containers during a hot summer?',
 'Last question: what is an easy way to keep aphids away without chemicals?']

CHAT_REPLIES = ['Start with easy, fast crops such as lettuce, radishes and herbs like basil or mint. They grow well in '
 'pots.',
 'Four hours of afternoon sun suits leafy greens and herbs. Fruiting plants such as tomatoes prefer six or '
 'more hours.',
 'Check the soil daily; in hot weather containers often need water once or twice a day, until it drains from '
 'the bottom.']

FEW_SHOT_INSTRUCTION = 'You are a quiz master. Answer each question with a short answer only.'

FEW_SHOT = [('What is the capital of France?', 'Paris'),
 ('How many legs does a spider have?', 'Eight'),
 ('What is the chemical symbol for gold?', 'Au'),
 ('Which planet is known as the Red Planet?', 'Mars'),
 ('What is 7 multiplied by 8?', '56'),
 ('Who wrote the play Romeo and Juliet?', 'William Shakespeare'),
 ('What is the largest ocean on Earth?', 'The Pacific Ocean'),
 ('How many days are there in a leap year?', '366')]

FEW_SHOT_FINAL_QUESTIONS = ['What is the boiling point of water at sea level in degrees Celsius?', 'What is the capital of Japan?']



def doc_messages(question: str) -> list[dict[str, str]]:
    """System prompt + document + one question (scenario a)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Briefing document:\n\n{DOCUMENT}\n\nQuestion: {question}"},
    ]


def chat_messages(turn: int) -> list[dict[str, str]]:
    """Conversation up to and including user turn ``turn`` (0-based) of the 4-turn chat (scenario b)."""
    msgs: list[dict[str, str]] = []
    for i in range(turn + 1):
        msgs.append({"role": "user", "content": CHAT_TURNS[i]})
        if i < turn:
            msgs.append({"role": "assistant", "content": CHAT_REPLIES[i]})
    return msgs


def few_shot_messages(final_question: str) -> list[dict[str, str]]:
    """Few-shot quiz as alternating turns, ending with ``final_question`` (scenario c)."""
    msgs = [{"role": "system", "content": FEW_SHOT_INSTRUCTION}]
    for q, a in FEW_SHOT:
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": a})
    msgs.append({"role": "user", "content": final_question})
    return msgs

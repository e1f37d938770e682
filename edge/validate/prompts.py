"""Golden prompts: plain prose, code, the chat template, and one longer than the 512-token window.

Written for this project (no third-party text). Calibration text for quantization must never
overlap these (a test checks 32-token windows).
"""

PROSE = (
    "The old harbour town sits where the river meets the sea, and for three hundred years its people have made "
    "their living from the water. In the early mornings the fishing boats leave before sunrise, their engines "
    "echoing off the stone walls of the quay, and by noon the market square fills with traders selling the day's "
    "catch."
)

CODE = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''

CHAT = "Explain in two sentences why the sky looks blue during the day and red at sunset."

LONG = (
    "A small museum near the lighthouse tells the story of the town's shipbuilding industry. During the "
    "nineteenth century, more than forty wooden ships were launched from the yards along the eastern bank, and "
    "some of them sailed as far as South America and India. The museum keeps models of these vessels, along with "
    "tools, logbooks, and letters written by sailors to their families. One letter, dated 1863, describes a storm "
    "off the coast of Portugal that lasted four days and nearly sank the ship. The writer ends by promising his "
    "mother that this will be his last voyage, although the museum notes that he went to sea again the following "
    "spring.\n\n"
    "Today the yards are gone, replaced by a marina and a row of cafes. Tourism has become the largest employer, "
    "and in summer the population nearly doubles. Some older residents worry that the town is losing its "
    "identity, while younger people point out that the visitors bring jobs that allow families to stay rather "
    "than move to the city. The debate continues at every council meeting, and it is unlikely to be settled "
    "soon.\n\n"
    "The council's latest proposal is a ferry service to the islands in the bay. Supporters say it would spread "
    "visitors across a wider area and relieve the crowded streets of the old town, while critics fear that the "
    "new pier would disturb the seabirds that nest on the northern cliffs. An environmental survey commissioned "
    "last year counted eleven species breeding within a kilometre of the proposed site, including a colony of "
    "puffins that has grown steadily since fishing nets were banned from the area. The survey recommended that "
    "any construction take place in winter, when the birds are at sea, and that the pier be built on pillars "
    "rather than on a solid foundation, so that the currents which carry food to the cliffs are not blocked.\n\n"
    "Meanwhile the school has started a project in which pupils interview the oldest residents about their "
    "childhoods. The recordings are stored in the library, and some have been played on the local radio station. "
    "One woman, now ninety-three, remembers carrying baskets of herring up the hill to the smokehouse, where her "
    "father worked from dawn until dark. Another recalls the winter of 1947, when the harbour froze for the first "
    "time in living memory and children skated between the boats. The teachers say the project has taught the "
    "pupils more about history than any textbook, and several families have asked for copies of the recordings "
    "to keep.\n\n"
    "At the edge of the town, a path climbs through fields of gorse to the ruins of a chapel. Walkers who reach "
    "the top are rewarded with a view of the whole coastline: the harbour below, the islands scattered across "
    "the bay, and on clear days the mountains far to the west. A bench placed there by the walking club carries "
    "a small brass plate with the words of a local poet, who wrote that the sea gives and the sea takes, and that "
    "a town which forgets this will not last long. Most visitors read the inscription, look out at the water for "
    "a while, and then walk back down in silence."
)

# name -> (text, wrap in the chat template?)
GOLDEN_PROMPTS: dict[str, tuple[str, bool]] = {
    "prose": (PROSE, False),
    "code": (CODE, False),
    "chat": (CHAT, True),
    "long": (LONG, False),
}

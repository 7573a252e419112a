"""Index groups of the iBUG 68-point scheme (0-16 jaw, 17-26 brows, 27-35 nose, 36-47 eyes, 48-67 mouth)."""

LEFT_EYE = list(range(36, 42))  # image-left eye (the subject's right)
RIGHT_EYE = list(range(42, 48))
MOUTH = list(range(48, 68))
OUTER_EYE_CORNERS = (36, 45)  # 300-W's inter-ocular normalisation

"""English outputs, hand-written and hand-labelled: (style, rule, question id, expected letters, status, output).

The questions are CMExam's (Chinese); English-writing models quote the Chinese option texts or
name the letters. «X» is replaced by option X's real text; ids as in cases_zh.py.
"""

A, E_, T, V, I = "answered", "empty", "truncated", "invalid", "ambiguous"

Q = "qwen2.5-en"
QWQ = "qwq-en"
R1 = "deepseek-r1-en"
H = "huatuo-o1-en"
S = "student-en"

CASES = [
    # ---- statement ---------------------------------------------------------------------------------
    (Q, "statement", "0", "C", A, "Answer: C"),
    (Q, "statement", "0", "C", A, "The answer is C."),
    (Q, "statement", "0", "C", A, "The correct answer is C. «C»\n\nExplanation: Whether upper GI bleeding presents as hematemesis or melena depends mainly on the amount and rate of bleeding."),
    (Q, "statement", "1", "E", A, "The correct option is E."),
    (Q, "statement", "1", "E", A, "Paroxysmal nocturnal dyspnea is a classic sign of left heart failure, so the correct option is E («E»)."),
    (Q, "statement", "3", "B", A, "**Answer:** B"),
    (Q, "statement", "3", "B", A, "Final Answer: B"),
    (Q, "statement", "3", "B", A, "## Final Answer\nB"),
    (Q, "statement", "4", "B", A, "The best answer is B, tracheal foreign body («B»)."),
    (Q, "statement", "4", "B", A, "Based on the inspiratory pattern, the answer should be B."),
    (Q, "statement", "7", "B", A, "So the answer would be B."),
    (Q, "statement", "7", "B", A, "I choose B."),
    (Q, "statement", "13", "E", A, "The most appropriate choice is E."),
    (Q, "statement", "13", "E", A, "Correct choice: E"),
    (Q, "statement", "2", "A", A, "A hoarse, barking cough suggests laryngeal involvement. The answer is A, «A»."),
    (Q, "statement", "5", "B", A, "Acute hepatitis causes hepatocellular jaundice without gallbladder enlargement. Therefore, the answer is B."),
    (Q, "statement", "6", "D", A, "Pain along one intercostal nerve is typical of herpes zoster.\n\nAnswer: D"),
    (Q, "statement", "40", "C", A, "The most useful test to confirm pneumonia here is a chest X-ray, so the answer is C."),
    (Q, "statement", "574", "E", A, "Imaging (B-mode ultrasound, MRI, CT) shows the extent of the mass, but only aspiration can characterise it. The answer is E."),
    (QWQ, "statement", "0", "C", A, "<think>\nOkay, so the question asks what determines whether upper GI bleeding presents as hematemesis, melena, or both. Option A, the underlying disease, isn't the deciding factor. Option B, the bleeding site, matters less. Option D, time in the stomach, affects color. So the answer should be C.\n</think>\n\nThe presentation depends mainly on the volume of bleeding.\n\n**Answer: C**"),
    (R1, "statement", "4", "B", A, "<think>\nAlright, paroxysmal inspiratory dyspnea means upper airway obstruction. Pneumothorax causes sudden chest pain, not inspiratory stridor. Acute bronchitis doesn't obstruct the large airway. So B, foreign body in the trachea.\n</think>\n\nParoxysmal inspiratory dyspnea indicates obstruction of the large airway, most commonly a tracheal foreign body.\n\n**Final Answer: B**"),
    (H, "statement", "7", "B", A, "## Thinking\n\nLong-term antipyretics or steroids disturb the normal temperature curve. Wasting fever is seen in sepsis, relapsing fever in Borrelia infection, continuous fever in typhoid. Hmm, the pattern here becomes irregular.\n\n## Final Response\n\nAfter long-term use of antipyretics or corticosteroids, the fever loses its pattern and is typically irregular. The correct answer is B. «B»."),
    (H, "statement", "13", "E", A, "## Thinking\n\nA globular abdomen that does not change shape with position suggests gas rather than ascites.\n\n## Final Response\n\nThe abdomen is globular and keeps its shape on turning, which points to intestinal gas: paralytic ileus. So the answer is E."),
    (S, "statement", "0", "C", A, "<think>\nThe amount of bleeding decides the presentation.\n</think>\n答案：C"),
    # statement negatives
    (Q, "statement", "3", "", E_, "The answer is Acute pancreatitis, given the rebound tenderness."),
    (Q, "statement", "3", "", E_, "The answer depends on the serum amylase level."),
    (Q, "statement", "0", "", E_, "Option A is not decisive, option B is secondary, and option D affects color."),
    (Q, "statement", "4", "", E_, "The answer is a tracheal foreign body in most children."),
    # ---- letter forms -------------------------------------------------------------------------------
    (Q, "letter-forms", "0", "C", A, "Answer: c"),
    (Q, "letter-forms", "0", "C", A, "The answer is (c)."),
    (Q, "letter-forms", "0", "C", A, "The correct answer is (C) «C»."),
    (Q, "letter-forms", "0", "C", A, "The answer is option C."),
    (Q, "letter-forms", "0", "C", A, "Answer: [C]"),
    (Q, "letter-forms", "0", "C", A, "Answer：Ｃ"),
    (Q, "letter-forms", "2223", "ABC", A, "Answers: A, B, C"),
    (Q, "letter-forms", "2223", "ABC", A, "The answers are A, B and C."),
    (Q, "letter-forms", "2223", "ABC", A, "The correct answers are A, B, and C."),
    (Q, "letter-forms", "2223", "ABC", A, "The correct answers are (A), (B) and (C)."),
    (Q, "letter-forms", "2567", "DE", A, "The correct options are D and E."),
    (Q, "letter-forms", "2567", "DE", A, "Answer: D, E"),
    (Q, "letter-forms", "2567", "DE", A, "The answer is (D) and (E)."),
    (Q, "letter-forms", "5035", "CDE", A, "Answer: CDE"),
    (Q, "letter-forms", "5035", "CDE", A, "The answers are c, d and e."),
    (Q, "letter-forms", "5082", "BCE", A, "The correct answers are B, C & E."),
    (Q, "letter-forms", "5106", "ABCE", A, "Answer: A, B, C and E. Sitagliptin and vildagliptin rarely cause hypoglycemia on their own; only vildagliptin is close, so I keep A, B, C and E."),
    (Q, "letter-forms", "432", "B", A, "Answer: B («B»)"),
    (R1, "letter-forms", "5082", "BCE", A, "<think>\nA 9-year-old with TB: isoniazid, rifampicin, PAS. Ethambutol is used with caution in children because of optic neuritis.\n</think>\n\n**Answer: B, C, E**"),
    # letter-form negatives
    (Q, "letter-forms", "3", "", E_, "The answer is CT-guided: a contrast CT would confirm the diagnosis."),
    (Q, "letter-forms", "40", "", E_, "Answer: X-ray findings would be needed first."),
    (Q, "letter-forms", "1", "", E_, "The answer is a left heart problem in most patients."),
    # ---- boxed ---------------------------------------------------------------------------------------
    (QWQ, "boxed", "0", "C", A, "<think>\nThe volume of bleeding decides it.\n</think>\n\nThe presentation depends on the amount of bleeding.\n\n\\boxed{C}"),
    (QWQ, "boxed", "1", "E", A, "<think>\nLeft heart failure.\n</think>\n\nThe final answer is $\\boxed{E}$."),
    (R1, "boxed", "2223", "ABC", A, "<think>\nSewage, runoff and industrial waste all add sulfate.\n</think>\n\n\\boxed{A, B, C}"),
    (R1, "boxed", "5082", "BCE", A, "<think>\n...\n</think>\n\n**Final Answer**\n\\boxed{BCE}"),
    (QWQ, "boxed", "432", "", V, "<think>\n...\n</think>\n\n\\boxed{E}"),
    # ---- postfix -------------------------------------------------------------------------------------
    (Q, "postfix", "0", "C", A, "C is correct."),
    (Q, "postfix", "0", "C", A, "Option C is the correct answer."),
    (Q, "postfix", "0", "C", A, "Therefore, C is correct: the amount of bleeding decides the presentation."),
    (Q, "postfix", "3", "B", A, "Only B is correct."),
    (Q, "postfix", "2223", "ABC", A, "A, B and C are correct."),
    (Q, "postfix", "2567", "DE", A, "D and E are the correct answers."),
    # postfix negatives
    (Q, "postfix", "0", "", E_, "A is incorrect. B is incorrect. D is not correct either."),
    (Q, "postfix", "0", "", E_, "A is wrong and B is wrong."),
    (Q, "postfix", "3", "", E_, "A patient is correct to seek care early."),
    # ---- line end -------------------------------------------------------------------------------------
    (Q, "line-end", "0", "C", A, "Answer: C\nA. «A» is not decisive."),
    (Q, "line-end", "574", "E", A, "Answer: E\nCT and MRI show the extent only."),
    (Q, "line-end", "65", "B", A, "Answer: B\nALT is a marker of hepatocyte injury, not of cancer."),
    (Q, "line-end", "1", "E", A, "The answer is E. A, B, C and D do not cause paroxysmal nocturnal dyspnea."),
    (Q, "line-end", "4", "B", A, "The answer is B.\nCOPD causes expiratory dyspnea."),
    (Q, "line-end", "2223", "ABC", A, "Answers: A, B, C\nD and E are less typical."),
    (Q, "line-end", "2567", "DE", A, "Answer: D, E\nA, B and C describe the retrospective cohort correctly."),
    (Q, "line-end", "3", "B", A, "The correct answer is B\nCT shows an enlarged pancreas."),
    # ---- explicit wins -------------------------------------------------------------------------------
    (Q, "explicit-wins", "0", "C", A, "Answer: C\n\nA\nThe underlying disease is not decisive."),
    (Q, "explicit-wins", "574", "E", A, "The answer is E.\n\nMRI\n\nshows soft tissue well but cannot characterise the mass."),
    (Q, "explicit-wins", "65", "B", A, "The answer is B.\n\nALT"),
    (Q, "explicit-wins", "1", "E", A, "Answer: E\n\nIncorrect options:\nA, B, C, D"),
    (Q, "explicit-wins", "1", "E", A, "Answer: E\n\nOther options:\nA. «A»\nB. «B»"),
    (Q, "explicit-wins", "3", "B", A, "The answer is B.\n\n**A**\nAcute gastritis rarely gives rebound tenderness."),
    (Q, "explicit-wins", "4", "B", A, "The answer is B.\n\nCOPD\nHBV\nMRI"),
    (Q, "explicit-wins", "0", "C", A, "Answer: C\n\nD. «D»"),
    (QWQ, "explicit-wins", "13", "E", A, "<think>\nParalytic ileus.\n</think>\n\nThe answer is E.\n\nNote: ascites gives a frog-belly shape (see A, B, C, D)."),
    (H, "explicit-wins", "585", "A", A, "## Thinking\n\nDeep abscess...\n\n## Final Response\n\nThe fluctuation test is unsuitable for deep abscesses. The answer is A.\n\nCT\nB-mode ultrasound"),
    # ---- last wins ----------------------------------------------------------------------------------
    (Q, "last-wins", "0", "C", A, "Answer: A\n\nWait, that's wrong: the amount of bleeding decides it. Answer: C"),
    (Q, "last-wins", "7", "B", A, "The answer is E. Correction: long-term steroids make the curve irregular, so the answer is B."),
    (Q, "last-wins", "2223", "ABC", A, "Answers: A, B\nOn reflection, industrial waste also raises sulfate. Final answer: A, B, C"),
    (QWQ, "last-wins", "1", "E", A, "<think>\n...\n</think>\n\nThe answer is D.\n\nActually, COPD gives expiratory dyspnea; PND is from left heart failure. The correct answer is E."),
    (H, "last-wins", "4", "B", A, "## Thinking\n\n...\n\n## Final Response\n\nThe answer is A. Sorry, that's a mistake: pneumothorax isn't inspiratory. The correct answer is B."),
    (Q, "last-wins", "13", "E", A, "The answer is not B but E."),
    (Q, "last-wins", "0", "C", A, "Answer: C\n\nSome might choose A, but the underlying disease is not decisive."),
    # ---- negation -----------------------------------------------------------------------------------
    (Q, "negation", "0", "C", A, "A is incorrect because the underlying disease is not decisive. The answer is C."),
    (Q, "negation", "0", "", E_, "The answer is not A."),
    (Q, "negation", "0", "", E_, "I would not choose A or B."),
    (Q, "negation", "3", "", E_, "If the answer were A, the pain would ease after vomiting."),
    (Q, "negation", "3", "", E_, "If the answer is A, the pain should ease after vomiting."),
    (Q, "negation", "3", "B", A, "If the answer were C, there would be jaundice. The answer is B."),
    (Q, "negation", "3", "B", A, "The answer is B. If we chose D, we would expect hematuria."),
    (Q, "negation", "1", "", E_, "Is the answer D? COPD usually causes expiratory dyspnea."),
    (Q, "negation", "1", "E", A, "Could the answer be D? No. The answer is E."),
    (Q, "negation", "574", "E", A, "Rule out C: CT cannot characterise the mass. Answer: E"),
    (QWQ, "negation", "5", "B", A, "<think>\nThe question asks which does NOT cause it.\n</think>\n\nSuppose the answer were C: pancreatic head cancer is the classic Courvoisier sign, so that cannot be. The answer is B."),
    (Q, "negation", "13", "E", A, "Answer: E\nAssuming the answer is A, the abdomen would be frog-shaped instead."),
    # ---- hedge --------------------------------------------------------------------------------------
    (Q, "hedge", "0", "", I, "The answer is C or D."),
    (Q, "hedge", "0", "", I, "Answer: C/D"),
    (Q, "hedge", "3", "", I, "The answer is either A or B, depending on amylase."),
    (Q, "hedge", "4", "", I, "The correct answer is B or C."),
    (QWQ, "hedge", "7", "", I, "<think>\nTorn between B and E.\n</think>\n\n**Answer: B or E**"),
    (Q, "hedge", "2567", "", I, "D/E"),
    # hedge negatives
    (Q, "hedge", "0", "C", A, "The answer is C or D. On reflection, color depends on time in the stomach; the form depends on volume. Final answer: C"),
    (Q, "hedge", "2567", "DE", A, "Answer: D and E"),
    # ---- bare line ----------------------------------------------------------------------------------
    (Q, "bare-line", "0", "C", A, "C\n\nExplanation: The presentation depends on the amount of bleeding."),
    (Q, "bare-line", "0", "C", A, "**C**\n\nThe amount of bleeding is the key factor."),
    (Q, "bare-line", "0", "C", A, "C. «C»"),
    (Q, "bare-line", "3", "B", A, "Option B"),
    (Q, "bare-line", "3", "B", A, "(B)"),
    (Q, "bare-line", "2223", "ABC", A, "A, B, C"),
    (Q, "bare-line", "5082", "BCE", A, "B, C, E\n\nIsoniazid, rifampicin and PAS are suitable for children."),
    (S, "bare-line", "7", "B", A, "<think>\nIrregular fever.\n</think>\nB"),
    # bare-line negatives
    (Q, "bare-line", "4", "", E_, "COPD\n\nusually gives expiratory dyspnea."),
    (Q, "bare-line", "3", "", E_, "CT\nMRI\n\nImaging would help."),
    (Q, "bare-line", "1", "", E_, "A. «A»\nB. «B»\nC. «C»"),
    # ---- option text ---------------------------------------------------------------------------------
    (Q, "option-text", "0", "C", A, "The answer is «C»."),
    (Q, "option-text", "65", "B", A, "The answer is AFP."),
    (Q, "option-text", "574", "C", A, "Answer: CT"),
    (Q, "option-text", "5082", "BCE", A, "The answers are «B», «C» and «E»."),
    (H, "option-text", "13", "E", A, "## Thinking\n\n...\n\n## Final Response\n\nThe most likely cause is paralytic ileus. The answer is «E»."),
    # option-text negatives
    (Q, "option-text", "0", "", I, "The answer is «B» or «C»."),
    (Q, "option-text", "3", "", E_, "The answer is pancreatitis of some kind; check amylase."),
    # ---- invalid ------------------------------------------------------------------------------------
    (Q, "invalid", "0", "", V, "Answer: F"),
    (Q, "invalid", "432", "", V, "The answer is E."),
    (Q, "invalid", "432", "B", A, "The answer is B."),
    # ---- truncated -----------------------------------------------------------------------------------
    (QWQ, "truncated", "0", "", T, "<think>\nOkay, let's think. The amount of bleeding... the answer is C? Let me check D again, time in the stomach"),
    (H, "truncated", "7", "", T, "## Thinking\n\nLong-term steroids... the answer is B"),
    (R1, "truncated", "1", "E", A, "Left heart failure causes PND.\n</think>\n\nThe answer is E."),
    # ---- final part ----------------------------------------------------------------------------------
    (QWQ, "final-part", "0", "C", A, "<think>\nAt first I think the answer is A. Hmm, no.\n</think>\n\nThe answer is C."),
    (QWQ, "final-part", "0", "", E_, "<think>\nThe answer is C.\n</think>\n\nI'm not sure."),
    (H, "final-part", "4", "B", A, "## Thinking\n\nI first thought the answer is A, but pneumothorax isn't inspiratory.\n\n## Final Response\n\nA tracheal foreign body is the most common cause. The answer is B."),
    # ---- empty ---------------------------------------------------------------------------------------
    (Q, "empty", "0", "", E_, "I'm sorry, I can't answer that."),
    (Q, "empty", "3", "", E_, "Further tests, including serum amylase and abdominal CT, are needed before a diagnosis."),
    (S, "empty", "0", "", E_, "<think>\nBleeding.\n</think>\n"),
]

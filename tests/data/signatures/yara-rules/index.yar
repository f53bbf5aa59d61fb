/*
Written for imguard's tests in the layout of Yara-Rules/rules: one index.yar including a folder per
category; rules in one file may use rules of another. The rule text is ours, the layout theirs.
*/
include "./utils/markers.yar"
include "./malware/MALW_Test.yar"

package kms

import (
	"regexp"
	"testing"
)

// FuzzValidateName: accepted names are exactly the ones the documented
// pattern matches.
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"a", "_identity", "A", "a-b.c_d", "", "é", "a\n"} {
		f.Add(s)
	}
	re := regexp.MustCompile(`\A[a-z0-9][a-z0-9._-]{0,63}\z`)
	f.Fuzz(func(t *testing.T, s string) {
		if (ValidateName(s) == nil) != re.MatchString(s) {
			t.Fatalf("ValidateName(%q) disagrees with the pattern", s)
		}
	})
}

// FuzzParseToken: presented tokens never panic the parser, and a parsed id is
// 16 characters.
func FuzzParseToken(f *testing.F) {
	f.Add("kms_0123456789abcdef_secret")
	f.Add("kms__")
	f.Fuzz(func(t *testing.T, s string) {
		id, secret, ok := parseToken(s)
		if ok && (len(id) != 16 || secret == "") {
			t.Fatalf("parseToken(%q) = %q, %q", s, id, secret)
		}
	})
}

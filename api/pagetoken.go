package api

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strings"
)

// Page tokens are opaque to clients: base64url of a version tag, the list
// they continue (keys, versions of one key, tokens), the position, and a
// check value over all three. A token from another list or another key,
// a changed one or one a client made up is refused with 400 instead of
// being read as a position. The check value is not a secret (the position
// grants nothing: every item is still checked against the caller), so a
// token stays valid across restarts and replicas.

const pageTokenTag = "kmsd-page-1"

func encodePageToken(list, scope, position string) string {
	if position == "" {
		return ""
	}
	body := pageTokenTag + "\x00" + list + "\x00" + scope + "\x00" + position
	sum := sha256.Sum256([]byte(body))
	return base64.RawURLEncoding.EncodeToString(append([]byte(body), sum[:8]...))
}

// decodePageToken returns the position a token holds, if it was made for
// this list and scope and is intact.
func decodePageToken(tok, list, scope string) (string, bool) {
	if len(tok) > 512 {
		return "", false
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || len(raw) < 8 {
		return "", false
	}
	body, check := raw[:len(raw)-8], raw[len(raw)-8:]
	sum := sha256.Sum256(body)
	if !bytes.Equal(sum[:8], check) {
		return "", false
	}
	parts := strings.Split(string(body), "\x00")
	if len(parts) != 4 || parts[0] != pageTokenTag || parts[1] != list || parts[2] != scope || parts[3] == "" {
		return "", false
	}
	return parts[3], true
}

// pagePosition reads the request's page_token for list and scope: "" when
// there is none; a token that does not decode or whose position valid
// refuses is answered 400 here (ok false).
func pagePosition(w http.ResponseWriter, r *http.Request, list, scope string, valid func(string) bool) (pos string, ok bool) {
	pt := r.URL.Query().Get("page_token")
	if pt == "" {
		return "", true
	}
	if pos, ok = decodePageToken(pt, list, scope); !ok || !valid(pos) {
		writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "malformed page_token: pass the next_page_token (for versions, also next_versions_page_token) of the previous page of this list unchanged")
		return "", false
	}
	return pos, true
}

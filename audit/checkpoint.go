package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// Checkpoint is the body of a C2SP tlog-checkpoint: origin, tree size, root.
type Checkpoint struct {
	Origin string
	Size   uint64
	Root   tlog.Hash
}

// Origin is the log's origin line: it names this service's log by its
// identity key, so checkpoints of another kmsd do not pass for this one's.
func Origin(pub []byte) string {
	h := sha256.Sum256(pub)
	return "github.com/kmsd-project/kmsd/audit/" + hex.EncodeToString(h[:8])
}

// Text is the checkpoint body as signed: three lines, each ending in "\n".
func (c Checkpoint) Text() string {
	return fmt.Sprintf("%s\n%d\n%s\n", c.Origin, c.Size, base64.StdEncoding.EncodeToString(c.Root[:]))
}

// ParseCheckpoint parses a checkpoint body (extension lines are allowed and
// ignored, as the format says).
func ParseCheckpoint(text string) (Checkpoint, error) {
	lines := strings.SplitAfter(text, "\n")
	if len(lines) < 4 || !strings.HasSuffix(text, "\n") {
		return Checkpoint{}, errors.New("malformed checkpoint: want origin, size and root lines")
	}
	var c Checkpoint
	c.Origin = strings.TrimSuffix(lines[0], "\n")
	size, err := strconv.ParseUint(strings.TrimSuffix(lines[1], "\n"), 10, 64)
	if err != nil || c.Origin == "" {
		return Checkpoint{}, errors.New("malformed checkpoint: bad origin or size line")
	}
	c.Size = size
	root, err := base64.StdEncoding.DecodeString(strings.TrimSuffix(lines[2], "\n"))
	if err != nil || len(root) != tlog.HashSize {
		return Checkpoint{}, errors.New("malformed checkpoint: bad root hash line")
	}
	copy(c.Root[:], root)
	return c, nil
}

// SignCheckpoint returns the signed note of c.
func SignCheckpoint(c Checkpoint, signer note.Signer) ([]byte, error) {
	return note.Sign(&note.Note{Text: c.Text()}, signer)
}

// OpenCheckpoint verifies a signed checkpoint with the identity public key
// and checks its origin.
func OpenCheckpoint(msg, pub []byte) (Checkpoint, error) {
	v, err := NewNoteVerifier(pub)
	if err != nil {
		return Checkpoint{}, err
	}
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		var inv *note.InvalidSignatureError
		var unv *note.UnverifiedNoteError
		switch {
		case errors.As(err, &inv):
			return Checkpoint{}, errors.New("signature does not verify with the identity key")
		case errors.As(err, &unv):
			return Checkpoint{}, errors.New("not signed by the identity key")
		}
		return Checkpoint{}, fmt.Errorf("malformed signed note: %v", err)
	}
	c, err := ParseCheckpoint(n.Text)
	if err != nil {
		return Checkpoint{}, err
	}
	if want := Origin(pub); c.Origin != want {
		return Checkpoint{}, fmt.Errorf("origin %q is not this service's log (%q)", c.Origin, want)
	}
	if !bytes.HasPrefix(msg, []byte(n.Text)) {
		return Checkpoint{}, errors.New("malformed signed note")
	}
	return c, nil
}

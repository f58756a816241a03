// Package backup is kmsd's backup file: a store's content (store.Sink) and
// its HE blobs, as one stream that ends with a signature by the service's
// identity key.
//
// The file is
//
//	"kmsd-backup-v1\n"
//	frames: type (1 byte) | length (4 bytes, big endian) | payload
//	        a blob frame: 'B' | SHA-256 (32 bytes) | size (8 bytes) | content
//	the trailer frame 'E' (JSON Trailer), last
//
// in this order: the header 'H', kmsd's metadata 'M', keys 'K' and their
// versions 'V', tokens 'T', audit rows 'R', the audit end 'A', the latest
// checkpoint 'C', pending audit records 'P', blobs 'B' or blob digests
// 'D', the summary 'S', the trailer 'E'. The trailer holds the SHA-256 of
// every byte before it and an ML-DSA-65 signature of that digest (context
// SignContext) by a version of the identity key the file itself holds.
//
// A reader refuses a file without its trailer (cut short: a backup killed
// while it was written), with bytes after it, with a frame out of order or
// unknown, with a blob whose content is not its digest, or whose digest is
// not the trailer's; Verify checks the signature, and BindHSM that the
// signing key is sealed under the HSM's KEK, so that a file is accepted
// only if a kmsd holding this HSM's identity key wrote it.
package backup

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store"
)

const (
	magic = "kmsd-backup-v1\n"
	// SignContext is the ML-DSA context of a backup's signature.
	SignContext = "kmsd-backup-v1"
	// Format names the file format in its header.
	Format = "kmsd-backup/1"
	// maxFrame bounds a frame other than a blob.
	maxFrame = 64 << 20
	// maxBlob bounds one blob (a logN 16 Galois key is about 100 MiB).
	maxBlob = 8 << 30
	// maxIdentityVersions bounds the identity key's versions a file may
	// hold (kmsd makes one).
	maxIdentityVersions = 256
	// maxKEKs bounds the KEKs a file's secrets may be sealed under.
	maxKEKs = 64
)

// Header opens a backup.
type Header struct {
	Format    string `json:"format"`
	Created   string `json:"created"` // RFC 3339, UTC
	Store     string `json:"store"`   // the driver it was taken from
	Kmsd      string `json:"kmsd"`    // the kmsd that wrote it
	WithBlobs bool   `json:"with_blobs"`
}

// Summary counts what a backup holds; it is the last frame the digest
// covers.
type Summary struct {
	Metas          int    `json:"metas"`
	Keys           int    `json:"keys"`
	Versions       int    `json:"versions"`
	Tokens         int    `json:"tokens"`
	AuditRows      int    `json:"audit_rows"`
	AuditSize      uint64 `json:"audit_size"` // the log's end: records it held
	PrunedBelow    uint64 `json:"pruned_below,omitempty"`
	CheckpointSize uint64 `json:"checkpoint_size,omitempty"`
	Pending        int    `json:"pending,omitempty"`
	Blobs          int    `json:"blobs"`
	BlobBytes      int64  `json:"blob_bytes"`
	BlobRefs       int    `json:"blob_refs,omitempty"` // digests listed without content
}

// Trailer ends a backup.
type Trailer struct {
	SHA256          string `json:"sha256"` // hex, of every byte before the trailer
	IdentityVersion uint64 `json:"identity_version"`
	Signature       []byte `json:"signature"`
}

// frame types, with the phase each belongs to: frames come in phase order.
var phases = map[byte]int{'H': 0, 'M': 1, 'K': 2, 'V': 2, 'T': 3, 'R': 4, 'A': 5, 'C': 6, 'P': 7, 'B': 8, 'D': 8, 'S': 9, 'E': 10}

// Writer writes a backup: it is the store.Sink a store dumps into, then
// takes the blobs, then Finish signs it.
type Writer struct {
	out   *bufio.Writer
	h     hash.Hash
	sum   Summary
	phase int
	err   error
	// identity holds the identity key's versions seen, for Finish.
	identity map[uint64]bool
}

var _ store.Sink = (*Writer)(nil)

// NewWriter starts a backup on w.
func NewWriter(w io.Writer, hdr Header) (*Writer, error) {
	bw := &Writer{out: bufio.NewWriterSize(w, 1<<20), h: sha256.New(), identity: map[uint64]bool{}}
	hdr.Format = Format
	bw.write([]byte(magic))
	b, _ := json.Marshal(hdr)
	return bw, bw.frame('H', b)
}

func (w *Writer) write(b []byte) {
	if w.err != nil {
		return
	}
	w.h.Write(b)
	_, w.err = w.out.Write(b)
}

func (w *Writer) frame(t byte, payload []byte) error {
	if w.err != nil {
		return w.err
	}
	if p := phases[t]; p < w.phase {
		return fmt.Errorf("backup: frame %q after the frames of a later part (a store sent its content out of order)", t)
	} else {
		w.phase = p
	}
	if len(payload) > maxFrame {
		return fmt.Errorf("backup: a %q record of %d bytes is over the %d a backup takes", t, len(payload), maxFrame)
	}
	var hd [5]byte
	hd[0] = t
	binary.BigEndian.PutUint32(hd[1:], uint32(len(payload)))
	w.write(hd[:])
	w.write(payload)
	return w.err
}

func (w *Writer) json(t byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return w.frame(t, b)
}

type metaFrame struct {
	Name  string `json:"name"`
	Value []byte `json:"value"`
}

type versionFrame struct {
	Key     string       `json:"key"`
	Version *kms.Version `json:"version"`
}

type endFrame struct {
	End         uint64 `json:"end"`
	PrunedBelow uint64 `json:"pruned_below"`
}

type checkpointFrame struct {
	Size uint64 `json:"size"`
	Note []byte `json:"note"`
}

// Meta implements store.Sink.
func (w *Writer) Meta(name string, value []byte) error {
	w.sum.Metas++
	return w.json('M', metaFrame{name, value})
}

// Key implements store.Sink.
func (w *Writer) Key(k *kms.Key) error { w.sum.Keys++; return w.json('K', k) }

// Version implements store.Sink.
func (w *Writer) Version(key string, v *kms.Version) error {
	w.sum.Versions++
	if key == kms.IdentityKeyName {
		w.identity[v.Number] = true
	}
	return w.json('V', versionFrame{key, v})
}

// Token implements store.Sink.
func (w *Writer) Token(t *kms.Token) error { w.sum.Tokens++; return w.json('T', t) }

// AuditRow implements store.Sink.
func (w *Writer) AuditRow(index uint64, row []byte) error {
	w.sum.AuditRows++
	return w.frame('R', append(binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(row)), index), row...))
}

// AuditEnd implements store.Sink.
func (w *Writer) AuditEnd(end, prunedBelow uint64) error {
	w.sum.AuditSize, w.sum.PrunedBelow = end, prunedBelow
	return w.json('A', endFrame{end, prunedBelow})
}

// Checkpoint implements store.Sink.
func (w *Writer) Checkpoint(size uint64, note []byte) error {
	w.sum.CheckpointSize = size
	return w.json('C', checkpointFrame{size, note})
}

// Pending implements store.Sink.
func (w *Writer) Pending(recs [][]byte) error {
	w.sum.Pending += len(recs)
	return w.json('P', recs)
}

// Blob writes a blob's content, read from r: size bytes whose SHA-256
// must be d.
func (w *Writer) Blob(d [32]byte, size int64, r io.Reader) error {
	if w.err != nil {
		return w.err
	}
	if phases['B'] < w.phase {
		return errors.New("backup: a blob after the summary")
	}
	w.phase = phases['B']
	if size < 0 || size > maxBlob {
		return fmt.Errorf("backup: blob %x is %d bytes, over the %d a backup takes", d, size, int64(maxBlob))
	}
	var hd [41]byte
	hd[0] = 'B'
	copy(hd[1:33], d[:])
	binary.BigEndian.PutUint64(hd[33:], uint64(size))
	w.write(hd[:])
	if w.err != nil {
		return w.err
	}
	check := sha256.New()
	n, err := io.Copy(io.MultiWriter(w.h, w.out, check), io.LimitReader(r, size))
	if err == nil && n != size {
		err = fmt.Errorf("backup: blob %x ended after %d of its %d bytes", d, n, size)
	}
	if err == nil && !bytes.Equal(check.Sum(nil), d[:]) {
		err = fmt.Errorf("backup: blob %x does not hash to its name (changed in the blob store?)", d)
	}
	if err != nil {
		w.err = err
		return err
	}
	w.sum.Blobs++
	w.sum.BlobBytes += size
	return nil
}

// BlobRef lists a blob by its digest only (a backup without blobs).
func (w *Writer) BlobRef(d [32]byte) error {
	w.sum.BlobRefs++
	return w.frame('D', d[:])
}

// Signer signs a backup's digest with a version of the identity key.
type Signer func(ctx context.Context, digest []byte) (sig []byte, version uint64, err error)

// Finish writes the summary and the signed trailer, flushes, and returns
// the summary and the backup's id (the digest the trailer signs, hex).
func (w *Writer) Finish(ctx context.Context, sign Signer) (Summary, string, error) {
	if err := w.json('S', w.sum); err != nil {
		return w.sum, "", err
	}
	digest := w.h.Sum(nil)
	sig, v, err := sign(ctx, digest)
	if err != nil {
		return w.sum, "", fmt.Errorf("sign the backup with the identity key: %w", err)
	}
	if !w.identity[v] {
		return w.sum, "", fmt.Errorf("backup: signed by identity version %d, which the backup does not hold", v)
	}
	id := hex.EncodeToString(digest)
	if err := w.json('E', Trailer{SHA256: id, IdentityVersion: v, Signature: sig}); err != nil {
		return w.sum, "", err
	}
	if err := w.out.Flush(); err != nil {
		return w.sum, "", err
	}
	return w.sum, id, nil
}

// Handler receives what Read reads: the store's content and the blobs.
type Handler interface {
	store.Sink
	// Blob gets a blob's content from r (size bytes); Read checks the
	// content against d after Blob returns, reading what Blob left.
	Blob(d [32]byte, size int64, r io.Reader) error
	// BlobRef is a blob listed by digest only.
	BlobRef(d [32]byte) error
}

// File is what Read found.
type File struct {
	Header  Header
	Summary Summary
	Trailer Trailer
	// ID is the hex SHA-256 of every byte before the trailer, which the
	// trailer's SHA256 matched.
	ID string
	// Identity holds the identity key's versions the file holds.
	Identity map[uint64]*kms.Version
}

// ErrMalformed is a file that is not a complete, well-formed backup.
var ErrMalformed = errors.New("not a complete kmsd backup")

func malformed(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, a...)...)
}

// hashReader hashes what it reads.
type hashReader struct {
	r io.Reader
	h hash.Hash
}

func (h *hashReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	return n, err
}

// Read reads a backup from r and gives its content to h, in file order;
// it checks the structure, every blob's digest and the trailer's digest,
// not the signature (Verify). On any error the caller must discard what h
// received.
func Read(r io.Reader, h Handler) (*File, error) {
	hr := &hashReader{r: bufio.NewReaderSize(r, 1<<20), h: sha256.New()}
	f := &File{Identity: map[uint64]*kms.Version{}}
	m := make([]byte, len(magic))
	if _, err := io.ReadFull(hr, m); err != nil || string(m) != magic {
		return nil, malformed("the file does not start as a kmsd backup does")
	}
	phase, seen := -1, map[byte]bool{}
	var rowsEnd uint64
	for {
		// The type byte is hashed after the look: the trailer's digest
		// covers every byte before the trailer frame.
		var t [1]byte
		if _, err := io.ReadFull(hr.r, t[:]); err != nil {
			return nil, malformed("it ends before its trailer (cut short: a backup that did not finish, or a truncated copy)")
		}
		digest := hr.h.Sum(nil)
		hr.h.Write(t[:])
		p, ok := phases[t[0]]
		if !ok {
			return nil, malformed("unknown frame type %q", t[0])
		}
		if p < phase || (phase == -1 && t[0] != 'H') {
			return nil, malformed("frame %q out of order", t[0])
		}
		if (t[0] == 'H' || t[0] == 'A' || t[0] == 'C' || t[0] == 'S') && seen[t[0]] {
			return nil, malformed("frame %q twice", t[0])
		}
		phase, seen[t[0]] = p, true
		if t[0] == 'B' {
			if err := readBlob(hr, h, f); err != nil {
				return nil, err
			}
			continue
		}
		var n [4]byte
		if _, err := io.ReadFull(hr, n[:]); err != nil {
			return nil, malformed("it ends inside a frame (cut short: a backup that did not finish, or a truncated copy)")
		}
		size := binary.BigEndian.Uint32(n[:])
		if size > maxFrame {
			return nil, malformed("a frame of %d bytes", size)
		}
		payload := make([]byte, size)
		if _, err := io.ReadFull(hr, payload); err != nil {
			return nil, malformed("it ends inside a frame (cut short: a backup that did not finish, or a truncated copy)")
		}
		if t[0] == 'E' {
			if !seen['S'] || !seen['A'] {
				return nil, malformed("the trailer comes without the summary or the audit end")
			}
			if err := strict(payload, &f.Trailer); err != nil {
				return nil, malformed("trailer: %v", err)
			}
			// The digest does not cover the trailer: it must be exactly
			// the bytes a writer makes of it (JSON field names match
			// whatever their case, base64 may carry stray bits).
			if b, _ := json.Marshal(f.Trailer); !bytes.Equal(b, payload) {
				return nil, malformed("the trailer is not in the form a backup writes it")
			}
			f.ID = hex.EncodeToString(digest)
			if f.Trailer.SHA256 != f.ID {
				return nil, malformed("its content does not hash to what the trailer says: the file was changed after it was written")
			}
			var extra [1]byte
			if n, _ := hr.r.Read(extra[:]); n != 0 {
				return nil, malformed("bytes after the trailer")
			}
			return f, nil
		}
		if err := dispatch(t[0], payload, h, f, &rowsEnd); err != nil {
			return nil, err
		}
	}
}

func readBlob(hr *hashReader, h Handler, f *File) error {
	var hd [40]byte
	if _, err := io.ReadFull(hr, hd[:]); err != nil {
		return malformed("it ends inside a blob")
	}
	var d [32]byte
	copy(d[:], hd[:32])
	size := binary.BigEndian.Uint64(hd[32:])
	if size > maxBlob {
		return malformed("a blob of %d bytes", size)
	}
	check := sha256.New()
	limited := &io.LimitedReader{R: hr, N: int64(size)}
	lr := io.TeeReader(limited, check)
	if err := h.Blob(d, int64(size), lr); err != nil {
		if limited.N > 0 {
			return malformed("it ends inside a blob (cut short: a backup that did not finish, or a truncated copy)")
		}
		return err
	}
	if _, err := io.Copy(io.Discard, lr); err != nil {
		return err
	}
	if limited.N > 0 {
		return malformed("it ends inside a blob (cut short: a backup that did not finish, or a truncated copy)")
	}
	if !bytes.Equal(check.Sum(nil), d[:]) {
		return malformed("blob %x does not hash to its name: the file was changed", d)
	}
	f.Summary.Blobs++
	f.Summary.BlobBytes += int64(size)
	return nil
}

// strict decodes JSON refusing unknown fields and trailing data.
func strict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("data after the value")
	}
	return nil
}

func dispatch(t byte, payload []byte, h Handler, f *File, rowsEnd *uint64) error {
	bad := func(err error) error { return malformed("a %q frame: %v", t, err) }
	switch t {
	case 'H':
		if err := strict(payload, &f.Header); err != nil {
			return bad(err)
		}
		if f.Header.Format != Format {
			return malformed("format %q, this kmsd reads %q", f.Header.Format, Format)
		}
		return nil
	case 'M':
		var m metaFrame
		if err := strict(payload, &m); err != nil {
			return bad(err)
		}
		return h.Meta(m.Name, m.Value)
	case 'K':
		var k kms.Key
		if err := json.Unmarshal(payload, &k); err != nil {
			return bad(err)
		}
		return h.Key(&k)
	case 'V':
		var v versionFrame
		if err := json.Unmarshal(payload, &v); err != nil || v.Version == nil {
			return bad(fmt.Errorf("no version: %v", err))
		}
		if v.Key == kms.IdentityKeyName {
			// Kept until the trailer names the one that signed: bounded,
			// whatever the file holds.
			if len(f.Identity) >= maxIdentityVersions {
				return malformed("more than %d versions of the identity key", maxIdentityVersions)
			}
			if len(v.Version.PublicKey) > 4096 || len(v.Version.Sealed) > 64<<10 {
				return malformed("an identity key version of %d+%d bytes", len(v.Version.PublicKey), len(v.Version.Sealed))
			}
			f.Identity[v.Version.Number] = &kms.Version{Number: v.Version.Number, PublicKey: v.Version.PublicKey, Sealed: v.Version.Sealed}
		}
		return h.Version(v.Key, v.Version)
	case 'T':
		var tk kms.Token
		if err := json.Unmarshal(payload, &tk); err != nil {
			return bad(err)
		}
		return h.Token(&tk)
	case 'R':
		if len(payload) < 8 {
			return bad(errors.New("short row"))
		}
		i := binary.BigEndian.Uint64(payload)
		if i < *rowsEnd {
			return malformed("audit rows out of order at %d", i)
		}
		*rowsEnd = i + 1
		return h.AuditRow(i, payload[8:])
	case 'A':
		var e endFrame
		if err := strict(payload, &e); err != nil {
			return bad(err)
		}
		return h.AuditEnd(e.End, e.PrunedBelow)
	case 'C':
		var c checkpointFrame
		if err := strict(payload, &c); err != nil {
			return bad(err)
		}
		return h.Checkpoint(c.Size, c.Note)
	case 'P':
		var recs [][]byte
		if err := json.Unmarshal(payload, &recs); err != nil {
			return bad(err)
		}
		return h.Pending(recs)
	case 'D':
		if len(payload) != 32 {
			return bad(errors.New("a digest is 32 bytes"))
		}
		var d [32]byte
		copy(d[:], payload)
		return h.BlobRef(d)
	case 'S':
		var s Summary
		if err := strict(payload, &s); err != nil {
			return bad(err)
		}
		if s.Blobs != f.Summary.Blobs || s.BlobBytes != f.Summary.BlobBytes {
			return malformed("the summary says %d blobs of %d bytes, the file holds %d of %d", s.Blobs, s.BlobBytes, f.Summary.Blobs, f.Summary.BlobBytes)
		}
		f.Summary = s
		return nil
	}
	return malformed("frame %q", t)
}

// ErrNotGenuine: the signature does not verify, or the key that made it
// is not this HSM's.
var ErrNotGenuine = errors.New("the backup's signature does not verify: it was changed, or not written by a kmsd holding this HSM's identity key")

// Verify checks the trailer's signature against the identity version it
// names, as the file holds it.
func Verify(f *File) error {
	v := f.Identity[f.Trailer.IdentityVersion]
	if v == nil {
		return fmt.Errorf("%w (it names identity version %d, which it does not hold)", ErrNotGenuine, f.Trailer.IdentityVersion)
	}
	kind, err := identityKind()
	if err != nil {
		return err
	}
	digest, _ := hex.DecodeString(f.ID)
	ok, err := kind.Verify(v.PublicKey, digest, []byte(SignContext), f.Trailer.Signature)
	if err != nil || !ok {
		return ErrNotGenuine
	}
	return nil
}

func identityKind() (kms.SigningKind, error) {
	for _, k := range pqc.Kinds() {
		if k.Name() == kms.IdentityKind {
			if s, ok := k.(kms.SigningKind); ok {
				return s, nil
			}
		}
	}
	return nil, errors.New("backup: no ML-DSA-65 kind")
}

// BindHSM checks that the identity version that signed f is sealed under
// sealer's KEK: it unseals it, as a signature by kmsd would, and signs a
// fresh challenge that its public key verifies. Whoever cannot seal under
// the KEK cannot make a file that passes.
func BindHSM(ctx context.Context, sealer kms.Sealer, f *File) error {
	v := f.Identity[f.Trailer.IdentityVersion]
	if v == nil {
		return ErrNotGenuine
	}
	kind, err := identityKind()
	if err != nil {
		return err
	}
	secret, err := sealer.Unseal(ctx, kms.SealContext{Key: kms.IdentityKeyName, Version: v.Number, Kind: kms.IdentityKind}, v.Sealed)
	if err != nil {
		return fmt.Errorf("%w (its identity key does not open under this HSM's KEK: %v)", ErrNotGenuine, err)
	}
	defer secret.Wipe()
	priv, err := kind.Load(secret)
	if err != nil {
		return fmt.Errorf("%w (%v)", ErrNotGenuine, err)
	}
	challenge := make([]byte, 32)
	_, _ = rand.Read(challenge)
	sig, err := kind.Sign(rand.Reader, priv, challenge, []byte("kmsd-backup-bind"))
	if err != nil {
		return err
	}
	if ok, err := kind.Verify(v.PublicKey, challenge, []byte("kmsd-backup-bind"), sig); err != nil || !ok {
		return fmt.Errorf("%w (the identity key sealed in it is not the one whose public key it lists)", ErrNotGenuine)
	}
	return nil
}

// Discard is a Handler that keeps nothing: Read with it checks a file.
type Discard struct{}

func (Discard) Meta(string, []byte) error                      { return nil }
func (Discard) Key(*kms.Key) error                             { return nil }
func (Discard) Version(string, *kms.Version) error             { return nil }
func (Discard) Token(*kms.Token) error                         { return nil }
func (Discard) AuditRow(uint64, []byte) error                  { return nil }
func (Discard) AuditEnd(uint64, uint64) error                  { return nil }
func (Discard) Checkpoint(uint64, []byte) error                { return nil }
func (Discard) Pending([][]byte) error                         { return nil }
func (Discard) Blob(d [32]byte, size int64, r io.Reader) error { return nil }
func (Discard) BlobRef([32]byte) error                         { return nil }

// KEKs is a Handler that notes, for each KEK the file's secrets are
// sealed under, which versions are (up to 20 names each).
type KEKs struct {
	Discard
	// BlobKEK reads the KEK id a sealed blob names (hsm.BlobKEK).
	BlobKEK func(blob []byte) (string, error)
	Under   map[string][]string
	counts  map[string]int
}

// Version implements Handler.
func (k *KEKs) Version(key string, v *kms.Version) error {
	if len(v.Sealed) == 0 {
		return nil
	}
	id, err := k.BlobKEK(v.Sealed)
	if err != nil {
		return malformed("the secret of %s version %d is not a sealed blob: %v", key, v.Number, err)
	}
	if k.Under == nil {
		k.Under, k.counts = map[string][]string{}, map[string]int{}
	}
	// Bounded before any signature is checked: a KEK id is 32 hex
	// digits, and a store has a handful of KEKs.
	if _, ok := k.Under[id]; !ok && (len(k.Under) >= maxKEKs || len(id) > 64) {
		return malformed("its secrets name more than %d KEKs, or a KEK id of %d bytes", maxKEKs, len(id))
	}
	if k.counts[id] < 20 {
		k.Under[id] = append(k.Under[id], fmt.Sprintf("%s v%d", key, v.Number))
	}
	k.counts[id]++
	return nil
}

// CheckKEKs checks that the HSM holds every KEK the file's secrets are
// sealed under (has: nil if it does): a backup taken during a KEK
// rotation holds secrets under the old KEK, which may be retired since.
func (k *KEKs) CheckKEKs(has func(id string) error) error {
	for id, names := range k.Under {
		if err := has(id); err != nil {
			return fmt.Errorf("%d secrets of the backup are sealed under KEK %s, which the HSM does not hold (retired after the backup was taken?): %s: %w", k.counts[id], id, strings.Join(names, ", "), err)
		}
	}
	return nil
}

package hsm

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// Profile is how the KEK protects a data key inside the token. Tokens
// differ in what they offer; the sealer picks the first profile the token
// can do (Profile "auto"), or the one configured, and every blob says
// which profile sealed it.
type Profile string

const (
	// ProfileAuto picks, in order: gcm, gcm-hsm-iv, kwp, cbc-hmac.
	ProfileAuto Profile = "auto"
	// ProfileGCM is AES-256-GCM in the token under an IV kmsd draws
	// (SoftHSM2, opencryptoki 3.17 and later, most HSMs).
	ProfileGCM Profile = "gcm"
	// ProfileGCMHSMIV is AES-256-GCM in the token under an IV the token
	// draws and writes back (AWS CloudHSM, Thales Luna in FIPS mode,
	// which refuse an IV from the application). kmsd stores it with the
	// blob.
	ProfileGCMHSMIV Profile = "gcm-hsm-iv"
	// ProfileCBCHMAC is AES-256-CBC with PKCS#7 padding under the KEK,
	// then HMAC-SHA-256 under a second key in the token over the
	// associated data, the IV and the ciphertext (encrypt-then-MAC), for
	// tokens without GCM (Debian 12's opencryptoki 3.8).
	ProfileCBCHMAC Profile = "cbc-hmac"
	// ProfileKWP is AES key wrap with padding (RFC 5649) in the token,
	// CKM_AES_KEY_WRAP_KWP or, where that is not listed,
	// CKM_AES_KEY_WRAP_PAD if the token's answers are RFC 5649's, under a
	// wrap-only key beside the KEK (label "<kek>-kwp"). What is wrapped is
	// the data key followed by a hash of the associated data, so the
	// wrap's integrity check covers both.
	ProfileKWP Profile = "kwp"
)

// CKM_AES_KEY_WRAP_KWP (PKCS#11 3.0), which miekg/pkcs11 does not name.
const ckmAESKeyWrapKWP = 0x0000210B

// Profiles lists the concrete profiles in the order auto tries them.
var Profiles = []Profile{ProfileGCM, ProfileGCMHSMIV, ProfileKWP, ProfileCBCHMAC}

// profile ids in KMS2 blobs.
var profileIDs = map[Profile]byte{ProfileGCM: 1, ProfileGCMHSMIV: 2, ProfileCBCHMAC: 3, ProfileKWP: 4}

// ParseProfile checks a configured profile name.
func ParseProfile(s string) (Profile, error) {
	p := Profile(s)
	if p == ProfileAuto || profileIDs[p] != 0 {
		return p, nil
	}
	return "", fmt.Errorf("unknown wrap profile %q: want auto, gcm, gcm-hsm-iv, kwp or cbc-hmac", s)
}

// needs lists the mechanisms a profile uses, by name.
func (p Profile) needs() map[uint]string {
	switch p {
	case ProfileGCM, ProfileGCMHSMIV:
		return map[uint]string{pkcs11.CKM_AES_GCM: "CKM_AES_GCM"}
	case ProfileCBCHMAC:
		return map[uint]string{pkcs11.CKM_AES_CBC_PAD: "CKM_AES_CBC_PAD", pkcs11.CKM_SHA256_HMAC: "CKM_SHA256_HMAC", pkcs11.CKM_GENERIC_SECRET_KEY_GEN: "CKM_GENERIC_SECRET_KEY_GEN"}
	}
	return nil
}

// lacks names the mechanisms of p the token does not list ("" if none).
func (p Profile) lacks(have map[uint]bool) string {
	if p == ProfileKWP {
		if kwpMechanism(have) == 0 {
			return "CKM_AES_KEY_WRAP_KWP (or CKM_AES_KEY_WRAP_PAD)"
		}
		return ""
	}
	var out []string
	for m, name := range p.needs() {
		if !have[m] {
			out = append(out, name)
		}
	}
	slices.Sort(out) // map order: sorted, for a stable message
	return strings.Join(out, ", ")
}

// kwpMechanism is the mechanism kwp uses on a token: KWP if listed, else
// PAD (PKCS#11 2.40's name for RFC 5649 on most tokens; the known-answer
// test refuses a token whose PAD is another padding), else 0.
func kwpMechanism(have map[uint]bool) uint {
	switch {
	case have[ckmAESKeyWrapKWP]:
		return ckmAESKeyWrapKWP
	case have[pkcs11.CKM_AES_KEY_WRAP_PAD]:
		return pkcs11.CKM_AES_KEY_WRAP_PAD
	}
	return 0
}

const (
	cbcIV    = 16
	macLabel = "kmsd-wrap-cbc-hmac-v1"
	kwpLabel = "kmsd-wrap-kwp-v1"
	// kwpValue is what kwp wraps: the data key and a SHA-256 of the
	// associated data; kwpWrapped, its RFC 5649 wrap.
	kwpValueSize   = dekSize + sha256.Size
	kwpWrappedSize = kwpValueSize + 8
)

// keys are the token objects a profile uses.
type keys struct {
	id  string // the KEK's id (hex CKA_ID)
	kek pkcs11.ObjectHandle
	mac pkcs11.ObjectHandle // cbc-hmac only
	kwp pkcs11.ObjectHandle // kwp only: the wrap-only key
	// kwpErr: the token's key wrap failed its known answer at connect
	// (kwp is then not used).
	kwpErr error
	have   map[uint]bool // the token's mechanisms
	ivs    *ivGuard      // gcm-hsm-iv: the IVs the token drew lately
}

// ivGuard remembers the IVs a token drew for gcm-hsm-iv (the last
// ivMemory of them) and refuses one drawn again: GCM's IV must never
// repeat under one key, and with the HSM drawing it, kmsd checks what it
// can.
type ivGuard struct {
	mu    sync.Mutex
	seen  map[string]bool
	order []string
}

const ivMemory = 1 << 16

func (g *ivGuard) fresh(iv []byte) bool {
	if g == nil {
		return true
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.seen == nil {
		g.seen = map[string]bool{}
	}
	k := string(iv)
	if g.seen[k] {
		return false
	}
	g.seen[k] = true
	g.order = append(g.order, k)
	if len(g.order) > ivMemory {
		delete(g.seen, g.order[0])
		g.order = g.order[1:]
	}
	return true
}

// wrapped is a data key under the KEK.
type wrapped struct {
	profile Profile
	iv      []byte
	ct      []byte
	mac     []byte // cbc-hmac only
}

// gcmEncrypter is implemented by a Module that stands for a token whose
// AES-GCM encryption differs from the standard call (tests: a token that
// draws the IV itself, as CloudHSM does). It returns the ciphertext and
// the IV the token used.
type gcmEncrypter interface {
	EncryptGCM(sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, aad, pt []byte) (ct, usedIV []byte, err error)
}

// gcmEncrypt encrypts with AES-GCM in the token and returns the IV it
// used: iv as given, unless the token wrote its own into the parameters.
func gcmEncrypt(mod Module, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, aad, pt []byte) ([]byte, []byte, error) {
	if g, ok := mod.(gcmEncrypter); ok {
		return g.EncryptGCM(sh, key, iv, aad, pt)
	}
	p := pkcs11.NewGCMParams(bytes.Clone(iv), aad, gcmTagBits)
	defer p.Free()
	if err := mod.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, key); err != nil {
		return nil, nil, fmt.Errorf("C_EncryptInit: %w", err)
	}
	ct, err := mod.Encrypt(sh, pt)
	if err != nil {
		return nil, nil, fmt.Errorf("C_Encrypt: %w", err)
	}
	used := p.IV()
	if len(used) != len(iv) {
		used = bytes.Clone(iv)
	}
	return ct, used, nil
}

func gcmDecrypt(mod Module, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, aad, ct []byte) ([]byte, error) {
	p := pkcs11.NewGCMParams(iv, aad, gcmTagBits)
	defer p.Free()
	if err := mod.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, p)}, key); err != nil {
		return nil, fmt.Errorf("C_DecryptInit: %w", err)
	}
	pt, err := mod.Decrypt(sh, ct)
	if err != nil {
		return nil, fmt.Errorf("C_Decrypt: %w", err)
	}
	return pt, nil
}

func cbcEncrypt(mod Module, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, pt []byte) ([]byte, error) {
	if err := mod.EncryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, key); err != nil {
		return nil, fmt.Errorf("C_EncryptInit: %w", err)
	}
	ct, err := mod.Encrypt(sh, pt)
	if err != nil {
		return nil, fmt.Errorf("C_Encrypt: %w", err)
	}
	return ct, nil
}

func cbcDecrypt(mod Module, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, iv, ct []byte) ([]byte, error) {
	if err := mod.DecryptInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC_PAD, iv)}, key); err != nil {
		return nil, fmt.Errorf("C_DecryptInit: %w", err)
	}
	pt, err := mod.Decrypt(sh, ct)
	if err != nil {
		return nil, fmt.Errorf("C_Decrypt: %w", err)
	}
	return pt, nil
}

func hmacSign(mod Module, sh pkcs11.SessionHandle, key pkcs11.ObjectHandle, msg []byte) ([]byte, error) {
	if err := mod.SignInit(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}, key); err != nil {
		return nil, fmt.Errorf("C_SignInit: %w", err)
	}
	mac, err := mod.Sign(sh, msg)
	if err != nil {
		return nil, fmt.Errorf("C_Sign: %w", err)
	}
	return mac, nil
}

// kwpValue is what kwp wraps for dek under aad: dek, then SHA-256 over a
// label and the length-prefixed associated data.
func kwpValue(dek, aad []byte) []byte {
	h := sha256.New()
	h.Write([]byte(kwpLabel))
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(aad))))
	h.Write(aad)
	return h.Sum(bytes.Clone(dek))
}

// kwpWrap wraps value with the token's key wrap: value becomes a session
// object (extractable, for this one call) that C_WrapKey wraps under
// wrapKey, then is destroyed. The data key is already in kmsd's memory:
// it goes into the token, never out of the process.
func kwpWrap(mod Module, sh pkcs11.SessionHandle, wrapKey pkcs11.ObjectHandle, mech uint, value []byte) ([]byte, error) {
	obj, err := mod.CreateObject(sh, append(dataKeyObject(), pkcs11.NewAttribute(pkcs11.CKA_VALUE, value)))
	if err != nil {
		return nil, fmt.Errorf("C_CreateObject (the data key to wrap): %w", err)
	}
	ct, err := mod.WrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, wrapKey, obj)
	if derr := destroyKeyObject(mod, sh, obj); derr != nil {
		return nil, derr
	}
	if err != nil {
		return nil, fmt.Errorf("C_WrapKey: %w", err)
	}
	return ct, nil
}

// errDirtySession: a session holds a session object with a data key that
// the token would not destroy; the pool closes the session, which
// destroys its objects (PKCS#11: session objects end with their session).
var errDirtySession = errors.New("the token kept a session object holding a data key")

// destroyKeyObject destroys a session object that holds a data key; if the
// token refuses, the operation fails and its session is closed.
func destroyKeyObject(mod Module, sh pkcs11.SessionHandle, obj pkcs11.ObjectHandle) error {
	if err := mod.DestroyObject(sh, obj); err != nil {
		return fmt.Errorf("%w (C_DestroyObject: %v): closing the session", errDirtySession, err)
	}
	return nil
}

// dataKeyObject is the session object kwp passes a data key through: a
// generic secret in this session only, readable by kmsd for the one call
// (destroyed after it: destroyKeyObject).
func dataKeyObject() []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
	}
}

// kwpUnwrap unwraps ct with the token's key wrap into a session object,
// reads its value and destroys it.
func kwpUnwrap(mod Module, sh pkcs11.SessionHandle, wrapKey pkcs11.ObjectHandle, mech uint, ct []byte) ([]byte, error) {
	obj, err := mod.UnwrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, wrapKey, ct, dataKeyObject())
	if err != nil {
		return nil, fmt.Errorf("C_UnwrapKey: %w", err)
	}
	a, err := mod.GetAttributeValue(sh, obj, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if derr := destroyKeyObject(mod, sh, obj); derr != nil {
		if err == nil && len(a) == 1 {
			clear(a[0].Value)
		}
		return nil, derr
	}
	if err != nil {
		return nil, fmt.Errorf("read the unwrapped data key: %w", err)
	}
	if len(a) != 1 {
		return nil, errors.New("read the unwrapped data key: no value")
	}
	return a[0].Value, nil
}

// macInput is what cbc-hmac authenticates: the associated data, the IV
// and the ciphertext, each length-prefixed.
func macInput(aad, iv, ct []byte) []byte {
	b := append([]byte{}, macLabel...)
	for _, f := range [][]byte{aad, iv, ct} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// errTag: the token's check of a wrapped key failed (a GCM tag, or the
// cbc-hmac MAC).
var errTag = errors.New("the wrapped data key failed its check")

// errNoSideKey: a blob names a profile whose key beside the KEK this KEK
// does not have (made by a kmsd that never made it: a forged or moved
// blob, since no blob of that profile was sealed under this KEK).
var errNoSideKey = errors.New("this KEK has no key of the profile the blob names")

// errGeneral: the token answered CKR_GENERAL_ERROR to an unwrap, which
// SoftHSM says for a bad GCM tag and other tokens for a failure.
var errGeneral = errors.New("the token answered CKR_GENERAL_ERROR")

// Exact sizes of a wrapped 32-byte data key's parts, by profile.
func (w wrapped) sizesOK() bool {
	switch w.profile {
	case ProfileGCM, ProfileGCMHSMIV:
		return len(w.iv) == gcmNonce && len(w.ct) == dekSize+gcmTagBits/8 && len(w.mac) == 0
	case ProfileCBCHMAC:
		return len(w.iv) == cbcIV && len(w.ct) == dekSize+16 && len(w.mac) == 32
	case ProfileKWP:
		return len(w.iv) == 0 && len(w.ct) == kwpWrappedSize && len(w.mac) == 0
	}
	return false
}

// wrap protects dek under the KEK with profile p.
func wrap(mod Module, sh pkcs11.SessionHandle, k keys, p Profile, aad, dek []byte) (wrapped, error) {
	w := wrapped{profile: p}
	switch p {
	case ProfileGCM:
		w.iv = make([]byte, gcmNonce)
		if _, err := io.ReadFull(rand.Reader, w.iv); err != nil {
			return w, err
		}
		ct, used, err := gcmEncrypt(mod, sh, k.kek, w.iv, aad, dek)
		if err != nil {
			return w, err
		}
		if !bytes.Equal(used, w.iv) {
			return w, errors.New("the token used another IV than the one given (it draws its own: use the gcm-hsm-iv profile)")
		}
		w.ct = ct
	case ProfileGCMHSMIV:
		zero := make([]byte, gcmNonce)
		ct, used, err := gcmEncrypt(mod, sh, k.kek, zero, aad, dek)
		if err != nil {
			return w, err
		}
		// A token that took the zero IV as given would reuse it for
		// every blob: GCM's nonce must never repeat under one key.
		if len(used) != gcmNonce || subtle.ConstantTimeCompare(used, zero) == 1 {
			return w, errors.New("the token did not draw an IV of its own (it used the zero IV it was given): use the gcm profile")
		}
		if !k.ivs.fresh(used) {
			return w, errors.New("the token drew an IV it had drawn before: refusing to seal under a repeated GCM IV")
		}
		w.iv, w.ct = used, ct
	case ProfileCBCHMAC:
		w.iv = make([]byte, cbcIV)
		if _, err := io.ReadFull(rand.Reader, w.iv); err != nil {
			return w, err
		}
		ct, err := cbcEncrypt(mod, sh, k.kek, w.iv, dek)
		if err != nil {
			return w, err
		}
		mac, err := hmacSign(mod, sh, k.mac, macInput(aad, w.iv, ct))
		if err != nil {
			return w, err
		}
		w.ct, w.mac = ct, mac
	case ProfileKWP:
		if k.kwpErr != nil {
			return w, k.kwpErr
		}
		if k.kwp == 0 {
			return w, fmt.Errorf("%w: no key-wrap key beside the KEK", ErrMechanism)
		}
		v := kwpValue(dek, aad)
		defer clear(v)
		ct, err := kwpWrap(mod, sh, k.kwp, kwpMechanism(k.have), v)
		if err != nil {
			return w, err
		}
		if len(ct) != kwpWrappedSize {
			return w, fmt.Errorf("the token's key wrap gave %d bytes for %d (not RFC 5649)", len(ct), len(v))
		}
		w.iv, w.ct = []byte{}, ct
	default:
		return w, fmt.Errorf("no wrap profile %q", p)
	}
	return w, nil
}

// unwrap opens w under the KEK; errTag if it fails its check.
func unwrap(mod Module, sh pkcs11.SessionHandle, k keys, aad []byte, w wrapped) ([]byte, error) {
	switch w.profile {
	case ProfileGCM, ProfileGCMHSMIV:
		dek, err := gcmDecrypt(mod, sh, k.kek, w.iv, aad, w.ct)
		if err != nil {
			// A tag mismatch: PKCS#11 says CKR_ENCRYPTED_DATA_INVALID
			// (opencryptoki, CloudHSM); SoftHSM answers
			// CKR_GENERAL_ERROR, which may also be a failing token:
			// Unseal tells them apart.
			switch rv(err) {
			case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:
				return nil, errTag
			case pkcs11.CKR_GENERAL_ERROR:
				return nil, errGeneral
			}
			return nil, err
		}
		return dek, nil
	case ProfileCBCHMAC:
		if k.mac == 0 {
			return nil, fmt.Errorf("%w: the blob names the cbc-hmac profile, and the token holds no MAC key beside the KEK", errNoSideKey)
		}
		mac, err := hmacSign(mod, sh, k.mac, macInput(aad, w.iv, w.ct))
		if err != nil {
			return nil, err
		}
		if subtle.ConstantTimeCompare(mac, w.mac) != 1 {
			return nil, errTag
		}
		dek, err := cbcDecrypt(mod, sh, k.kek, w.iv, w.ct)
		if err != nil {
			if r := rv(err); r == pkcs11.CKR_ENCRYPTED_DATA_INVALID || r == pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE {
				return nil, errTag
			}
			return nil, err
		}
		return dek, nil
	case ProfileKWP:
		if k.kwpErr != nil {
			return nil, k.kwpErr
		}
		if k.kwp == 0 {
			return nil, fmt.Errorf("%w: the blob names the kwp profile, and the token holds no key-wrap key beside the KEK", errNoSideKey)
		}
		v, err := kwpUnwrap(mod, sh, k.kwp, kwpMechanism(k.have), w.ct)
		if err != nil {
			switch rv(err) {
			case pkcs11.CKR_WRAPPED_KEY_INVALID, pkcs11.CKR_WRAPPED_KEY_LEN_RANGE, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE:
				return nil, errTag
			case pkcs11.CKR_GENERAL_ERROR:
				return nil, errGeneral
			}
			return nil, err
		}
		defer clear(v)
		want := kwpValue(make([]byte, dekSize), aad)
		if len(v) != kwpValueSize || subtle.ConstantTimeCompare(v[dekSize:], want[dekSize:]) != 1 {
			return nil, errTag
		}
		return bytes.Clone(v[:dekSize]), nil
	}
	return nil, fmt.Errorf("no wrap profile %q", w.profile)
}

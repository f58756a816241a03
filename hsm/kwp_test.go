package hsm_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/sealertest"
)

// TestSoftKWPMatchesRFC5649: the reference the kwp known answer is checked
// against gives RFC 5649's own examples (section 6).
func TestSoftKWPMatchesRFC5649(t *testing.T) {
	kek, _ := hex.DecodeString("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")
	for _, c := range []struct{ key, want string }{
		{"c37b7e6492584340bed12207808941155068f738", "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"},
		{"466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"},
	} {
		key, _ := hex.DecodeString(c.key)
		if got := hex.EncodeToString(hsm.SoftKWP(kek, key)); got != c.want {
			t.Errorf("RFC 5649 wrap of %s: %s, want %s", c.key, got, c.want)
		}
	}
}

// noGCM is a token without AES-GCM (as Debian 12's opencryptoki, unless
// withGCM), and optionally: without AES key wrap; whose
// CKM_AES_KEY_WRAP_PAD is not RFC 5649 (PKCS#7 padding, then RFC 3394:
// eight more bytes); whose key unwrap fails (CKR_GENERAL_ERROR); that
// will not destroy objects; or whose policy refuses to make wrap keys.
type noGCM struct {
	hsm.Module
	withGCM       bool
	noKWP         bool
	otherPad      bool
	failUnwrap    bool
	failDestroy   bool
	noWrapKeyMade bool
}

func (n *noGCM) GetMechanismList(slot uint) ([]*pkcs11.Mechanism, error) {
	ms, err := n.Module.GetMechanismList(slot)
	var out []*pkcs11.Mechanism
	for _, m := range ms {
		switch {
		case m.Mechanism == pkcs11.CKM_AES_GCM && !n.withGCM:
		case n.noKWP && (m.Mechanism == pkcs11.CKM_AES_KEY_WRAP_PAD || m.Mechanism == 0x210B):
		default:
			out = append(out, m)
		}
	}
	return out, err
}

func (n *noGCM) WrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, wk, key pkcs11.ObjectHandle) ([]byte, error) {
	ct, err := n.Module.WrapKey(sh, m, wk, key)
	if n.otherPad && err == nil {
		ct = append(ct, make([]byte, 8)...)
	}
	return ct, err
}

func (n *noGCM) UnwrapKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, k pkcs11.ObjectHandle, ct []byte, a []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if n.failUnwrap {
		return 0, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	}
	return n.Module.UnwrapKey(sh, m, k, ct, a)
}

func (n *noGCM) DestroyObject(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle) error {
	if n.failDestroy {
		return pkcs11.Error(pkcs11.CKR_FUNCTION_FAILED)
	}
	return n.Module.DestroyObject(sh, o)
}

func (n *noGCM) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, t []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	for _, a := range t {
		if n.noWrapKeyMade && a.Type == pkcs11.CKA_WRAP && len(a.Value) == 1 && a.Value[0] == 1 {
			return 0, pkcs11.Error(pkcs11.CKR_TEMPLATE_INCONSISTENT)
		}
	}
	return n.Module.GenerateKey(sh, m, t)
}

func openNoGCM(t *testing.T, n *noGCM, label string, profile hsm.Profile, create bool) (*hsm.Sealer, error) {
	t.Helper()
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.Profile, cfg.CreateKEK = label, profile, create
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	n.Module = mod
	cfg.Loaded = n
	s, err := hsm.Open(cfg)
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// TestKWPWithoutGCM: on a token without AES-GCM that offers AES key wrap
// with padding, auto makes the wrap-only key beside a new KEK and seals
// with kwp (before cbc-hmac); the conformance suite passes; a changed
// wrap is refused; a blob opens where GCM is back, and is refused with a
// clear error on a token without key wrap.
func TestKWPWithoutGCM(t *testing.T) {
	s, err := openNoGCM(t, &noGCM{}, "kwp-kek", hsm.ProfileAuto, true)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileKWP {
		t.Fatalf("profile %s, want kwp", s.Profile())
	}
	sealertest.Run(t, func(t *testing.T) kms.Sealer { return s })
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("wrapped, RFC 5649")))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(blob, []byte("KMS2\x04")) {
		t.Fatalf("not a kwp blob: %x", blob[:5])
	}
	// Each byte of the wrapped key changed: refused as a blob that does
	// not open (not a token failure). KMS2|id|u16+kekID|u16+IV(0)|u16+wrapped.
	off := 5 + 2 + len(s.KEKID()) + 2 + 2
	for i := 0; i < 72; i += 9 {
		bad := bytes.Clone(blob)
		bad[off+i] ^= 0x80
		if _, err := s.Unseal(ctx, sc, bad); !errors.Is(err, hsm.ErrBlob) {
			t.Fatalf("wrapped key changed at byte %d: %v", i, err)
		}
	}
	s.Close()

	withGCM, err := openNoGCM(t, &noGCM{}, "kwp-kek", hsm.ProfileGCM, false)
	if err == nil {
		t.Fatal("gcm by name on a token without GCM opened")
	}
	if !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_AES_GCM") {
		t.Fatalf("gcm by name on a token without GCM: %v", err)
	}
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.CreateKEK = "kwp-kek", false
	withGCM, err = hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if withGCM.Profile() != hsm.ProfileGCM {
		t.Fatalf("with GCM back, profile %s", withGCM.Profile())
	}
	if got, err := withGCM.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "wrapped, RFC 5649" {
		t.Fatalf("kwp blob where GCM is back: %v", err)
	}
	withGCM.Close()

	noWrap, err := openNoGCM(t, &noGCM{noKWP: true}, "kwp-kek", hsm.ProfileAuto, false)
	if err != nil {
		t.Fatal(err)
	}
	if noWrap.Profile() != hsm.ProfileCBCHMAC {
		t.Fatalf("without GCM and key wrap, profile %s", noWrap.Profile())
	}
	if _, err := noWrap.Unseal(ctx, sc, blob); !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_AES_KEY_WRAP_KWP") {
		t.Fatalf("kwp blob on a token without key wrap: %v", err)
	}
	if _, err := openNoGCM(t, &noGCM{noKWP: true}, "kwp-kek", hsm.ProfileKWP, false); !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_AES_KEY_WRAP_KWP") {
		t.Fatalf("kwp by name on a token without key wrap: %v", err)
	}
}

// TestKWPKeyWrapsOnly: the kwp profile's key beside the KEK is sensitive,
// never extractable, and can wrap and unwrap but not encrypt or decrypt;
// the KEK cannot wrap.
func TestKWPKeyWrapsOnly(t *testing.T) {
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.Profile = "kwp-attrs", hsm.ProfileKWP
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileKWP {
		t.Fatalf("profile %s", s.Profile())
	}
	s.Close()
	mod, _ := hsm.LoadModule(cfg.Module)
	mod.Initialize()
	defer mod.Finalize()
	slot, _ := hsm.FindToken(mod, cfg.TokenLabel)
	sh, _ := mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	mod.Login(sh, pkcs11.CKU_USER, cfg.PIN)
	find := func(label string) pkcs11.ObjectHandle {
		mod.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
		objs, _, _ := mod.FindObjects(sh, 2)
		mod.FindObjectsFinal(sh)
		if len(objs) != 1 {
			t.Fatalf("%d objects labelled %q", len(objs), label)
		}
		return objs[0]
	}
	attrs := func(o pkcs11.ObjectHandle) map[uint]bool {
		as, err := mod.GetAttributeValue(sh, o, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_WRAP, nil), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, nil), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, nil),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil), pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		})
		if err != nil {
			t.Fatal(err)
		}
		m := map[uint]bool{}
		for _, a := range as {
			m[a.Type] = len(a.Value) == 1 && a.Value[0] == 1
		}
		return m
	}
	k := attrs(find("kwp-attrs-kwp"))
	if !k[pkcs11.CKA_WRAP] || !k[pkcs11.CKA_UNWRAP] || k[pkcs11.CKA_ENCRYPT] || k[pkcs11.CKA_DECRYPT] || !k[pkcs11.CKA_SENSITIVE] || !k[pkcs11.CKA_NEVER_EXTRACTABLE] {
		t.Fatalf("key-wrap key attributes %v", k)
	}
	kek := attrs(find("kwp-attrs"))
	if kek[pkcs11.CKA_WRAP] || kek[pkcs11.CKA_UNWRAP] {
		t.Fatalf("KEK attributes %v: the KEK wraps", kek)
	}
	// Its one use is AES key wrap with padding (CKA_ALLOWED_MECHANISMS):
	// C_WrapKey with AES-CBC (a raw AES encryption of a chosen value) is
	// refused.
	chosen, err := mod.CreateObject(sh, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, make([]byte, 16)),
	})
	if err != nil {
		t.Fatal(err)
	}
	wk := find("kwp-attrs-kwp")
	if _, err := mod.WrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CBC, make([]byte, 16))}, wk, chosen); err == nil {
		t.Fatal("the key-wrap key wraps with AES-CBC")
	}
	if _, err := mod.WrapKey(sh, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, wk, chosen); err != nil {
		t.Fatalf("the key-wrap key does not wrap with CKM_AES_KEY_WRAP_PAD: %v", err)
	}
}

// TestKWPPadOfAnotherKind: a token whose CKM_AES_KEY_WRAP_PAD pads with
// PKCS#7 before RFC 3394 (other bytes than RFC 5649, eight more of them)
// is found by the known answer: auto passes over kwp, and kwp by name is
// refused naming why.
func TestKWPPadOfAnotherKind(t *testing.T) {
	s, err := openNoGCM(t, &noGCM{otherPad: true}, "kwp-other-pad", hsm.ProfileAuto, true)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileCBCHMAC {
		t.Fatalf("profile %s, want cbc-hmac", s.Profile())
	}
	_, err = openNoGCM(t, &noGCM{otherPad: true}, "kwp-other-pad", hsm.ProfileKWP, false)
	if !errors.Is(err, hsm.ErrSelfTest) || !strings.Contains(err.Error(), "RFC 5649") {
		t.Fatalf("kwp by name where PAD is not RFC 5649: %v", err)
	}
}

// kwpBlob seals a kwp blob on a new KEK labelled label (GCM hidden, so
// auto picks kwp) and closes that sealer.
func kwpBlob(t *testing.T, label, text string) []byte {
	t.Helper()
	s, err := openNoGCM(t, &noGCM{}, label, hsm.ProfileAuto, true)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Profile() != hsm.ProfileKWP {
		t.Fatalf("profile %s", s.Profile())
	}
	b, err := s.Seal(context.Background(), sc, kms.NewSecret([]byte(text)))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKWPTokenFailureIsNotABadBlob: a sealer that seals with gcm opens kwp
// blobs too; when the token's key unwrap fails (CKR_GENERAL_ERROR, as
// SoftHSM also answers for a bad wrap), the check that tells a failing
// token from a bad blob must go through the blob's profile: a gcm round
// trip passed, and every kwp blob was reported as not opening (review
// finding).
func TestKWPTokenFailureIsNotABadBlob(t *testing.T) {
	blob := kwpBlob(t, "kwp-failing-unwrap", "sealed with kwp")
	n := &noGCM{withGCM: true}
	s, err := openNoGCM(t, n, "kwp-failing-unwrap", hsm.ProfileAuto, false)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileGCM {
		t.Fatalf("profile %s", s.Profile())
	}
	ctx := context.Background()
	if got, err := s.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "sealed with kwp" {
		t.Fatalf("kwp blob on a gcm sealer: %v", err)
	}
	n.failUnwrap = true
	_, err = s.Unseal(ctx, sc, blob)
	if err == nil || errors.Is(err, hsm.ErrBlob) || !strings.Contains(err.Error(), "kwp round trip") {
		t.Fatalf("a failing key unwrap: %v, want the token's failure, not a blob that does not open", err)
	}
	// A bad kwp blob on a working token is still a blob that does not open.
	n.failUnwrap = false
	bad := bytes.Clone(blob)
	bad[5+2+len(s.KEKID())+2+2+10] ^= 1
	if _, err := s.Unseal(ctx, sc, bad); !errors.Is(err, hsm.ErrBlob) {
		t.Fatalf("a changed kwp blob: %v", err)
	}
}

// TestKWPDataKeyObjectNotKept: the data key passes through a session
// object; when the token will not destroy it, the seal fails and the
// session is closed (which ends its objects), rather than succeeding and
// leaving the key readable in a pooled session (review finding).
func TestKWPDataKeyObjectNotKept(t *testing.T) {
	n := &noGCM{}
	s, err := openNoGCM(t, n, "kwp-no-destroy", hsm.ProfileAuto, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("x")))
	if err != nil {
		t.Fatal(err)
	}
	n.failDestroy = true
	if _, err := s.Seal(ctx, sc, kms.NewSecret([]byte("y"))); err == nil || !strings.Contains(err.Error(), "session object") {
		t.Fatalf("seal where the token keeps the object: %v", err)
	}
	if _, err := s.Unseal(ctx, sc, blob); err == nil || !strings.Contains(err.Error(), "session object") {
		t.Fatalf("unseal where the token keeps the object: %v", err)
	}
	// Session objects are visible to every session of the process: none
	// with a value is left.
	cfg := testhsm.Config(t)
	slot, _ := hsm.FindToken(n.Module, cfg.TokenLabel)
	sh, err := n.Module.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Module.CloseSession(sh)
	n.Module.FindObjectsInit(sh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY)})
	objs, _, _ := n.Module.FindObjects(sh, 10)
	n.Module.FindObjectsFinal(sh)
	if len(objs) != 0 {
		t.Fatalf("%d session key objects left in the token", len(objs))
	}
	n.failDestroy = false
	if got, err := s.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "x" {
		t.Fatalf("after the token destroys again: %v", err)
	}
}

// TestForgedKWPBlobOnAKEKWithoutKWP: a blob relabelled as kwp, under a KEK
// that never had a key-wrap key (so no kwp blob was ever sealed under
// it), is a blob that does not open, not an HSM lacking a mechanism (a
// 503 that points operators at the HSM); readiness holds (review
// finding).
func TestForgedKWPBlobOnAKEKWithoutKWP(t *testing.T) {
	cfg := testhsm.Config(t)
	cfg.KEKLabel, cfg.Profile = "gcm-only", hsm.ProfileGCM
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := []byte(s.KEKID())
	field := func(b []byte) []byte { return append([]byte{byte(len(b) >> 8), byte(len(b))}, b...) }
	b := append([]byte("KMS2\x04"), field(id)...)
	b = append(b, field(nil)...)
	b = append(b, field(make([]byte, 72))...)
	b = append(b, field(nil)...)
	b = append(b, make([]byte, 12+40)...)
	ctx := context.Background()
	if _, err := s.Unseal(ctx, sc, b); !errors.Is(err, hsm.ErrBlob) || errors.Is(err, hsm.ErrMechanism) {
		t.Fatalf("forged kwp blob: %v", err)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("ping after a forged blob: %v", err)
	}
}

// TestAutoStartsWhereWrapKeysAreRefused: under auto, a token whose policy
// refuses to make a key that can wrap still starts (with gcm), without
// the kwp profile; kwp by name is refused there naming why (review
// finding).
func TestAutoStartsWhereWrapKeysAreRefused(t *testing.T) {
	s, err := openNoGCM(t, &noGCM{withGCM: true, noWrapKeyMade: true}, "no-wrap-keys", hsm.ProfileAuto, true)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileGCM {
		t.Fatalf("profile %s", s.Profile())
	}
	if _, err := openNoGCM(t, &noGCM{withGCM: true, noWrapKeyMade: true}, "no-wrap-keys-2", hsm.ProfileKWP, true); err == nil || !strings.Contains(err.Error(), "key-wrap key") {
		t.Fatalf("kwp by name where wrap keys are refused: %v", err)
	}
}

// TestKWPBlobOnATokenFailingTheKnownAnswer: the kwp known answer runs at
// every connection, not only when kwp is chosen: a gcm sealer on a token
// whose key wrap is not RFC 5649 refuses kwp blobs naming the known
// answer, rather than reporting them as blobs that do not open.
func TestKWPBlobOnATokenFailingTheKnownAnswer(t *testing.T) {
	blob := kwpBlob(t, "kwp-kat-later", "k")
	s, err := openNoGCM(t, &noGCM{withGCM: true, otherPad: true}, "kwp-kat-later", hsm.ProfileAuto, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Unseal(context.Background(), sc, blob); !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "known answer") {
		t.Fatalf("kwp blob where the key wrap fails its known answer: %v", err)
	}
}

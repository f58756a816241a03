package hsm

import (
	"fmt"

	"github.com/miekg/pkcs11"
)

// InitToken initializes a free slot's token with label and sets its user PIN.
// It is for HSMs that offer an empty slot for new tokens (SoftHSM does); a
// production HSM's token is set up by its own tools. mod must be initialized.
func InitToken(mod Module, label, soPIN, userPIN string) error {
	slots, err := mod.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("list slots: %w", err)
	}
	free, found := uint(0), false
	for _, slot := range slots {
		ti, err := mod.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			free, found = slot, true
			break
		}
	}
	if !found {
		return fmt.Errorf("no free slot to initialize token %q in", label)
	}
	if err := mod.InitToken(free, soPIN, label); err != nil {
		return fmt.Errorf("initialize token %q: %w", label, err)
	}
	// SoftHSM moves a newly initialized token to a new slot id: find it again.
	slot, err := FindToken(mod, label)
	if err != nil {
		return err
	}
	sh, err := mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("open session on token %q: %w", label, err)
	}
	defer mod.CloseSession(sh)
	if err := mod.Login(sh, pkcs11.CKU_SO, soPIN); err != nil {
		return fmt.Errorf("log in as security officer on token %q: %w", label, err)
	}
	defer mod.Logout(sh)
	if err := mod.InitPIN(sh, userPIN); err != nil {
		return fmt.Errorf("set the user PIN of token %q: %w", label, err)
	}
	return nil
}

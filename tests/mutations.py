"""Break the code on purpose, one line at a time, and check that a test fails.

    python tests/mutations.py                  # every break (about 6 minutes on 2 CPU cores)
    python tests/mutations.py cutmix focal     # the breaks whose names contain one of these words
    python tests/mutations.py --list           # the breaks and their tests, nothing run

Each break names a file, the exact text of one line of it (matched after stripping indentation, which the broken
form keeps), its broken form (one or more lines), and the tests that must catch it. For each break the tracked and
untracked-but-not-ignored files of the repository are copied to a temporary folder, the line is replaced there (the
real files are never touched), and only the listed tests run in the copy (`python -m pytest -q -x`, cwd the copy:
its tests import the copy's some_define.py). A break is CAUGHT when a test fails, SURVIVED when all pass; a line
that is not found, or found more than once, is an ERROR (the code moved: update the break). Before the breaks, the
listed tests run once on the unbroken copy: a test that fails there catches nothing. Exits 1 when any break
survived or erred.

Not part of the default test run (too slow). Run it after changing a mechanism it covers, and add a break when you
add a mechanism with a "same as" claim.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD = 'some_define.py'


@dataclass
class Break:
    name: str
    file: str
    line: str           # the exact text of the line (indentation aside)
    broken: str         # what replaces it ('\n' between lines; each line gets the original's indentation)
    tests: tuple        # pytest node ids, relative to the repository root


BREAKS = [
    # -------------------------------------------------------------------------------- the transposed conv
    Break('transposed conv: the fast path never runs', SD,
          'if output_size is not None or self.kernel_size != (2 * s, 2 * s) or self.stride != (s, s) \\',
          'if True or output_size is not None or self.kernel_size != (2 * s, 2 * s) or self.stride != (s, s) \\',
          ('tests/test_speed_paths.py::test_the_fcn_runs_the_fast_kernel_not_a_transposed_conv',)),
    Break('transposed conv: output_padding taken the fast way', SD,
          'or self.padding != (p, p) or self.output_padding != (0, 0) or self.groups != 1 \\',
          'or self.padding != (p, p) or self.groups != 1 \\',
          ('tests/test_speed_paths.py::test_a_transposed_conv_the_fast_form_cannot_compute_keeps_its_own',)),
    Break('transposed conv: the kernel not flipped', SD,
          'weight = self.weight.view(cin, cout, 2, s, 2, s).permute(1, 3, 5, 0, 2, 4).flip(4, 5)',
          'weight = self.weight.view(cin, cout, 2, s, 2, s).permute(1, 3, 5, 0, 2, 4)',
          ('tests/test_speed_paths.py::test_shuffle_conv_transpose_is_the_transposed_conv',)),
    Break("placement: the book's layers not swapped for the fast ones", SD,
          'fast_layers(model).to(device)',
          'model.to(device)',
          ('tests/test_speed_paths.py::test_the_fcn_runs_the_fast_kernel_not_a_transposed_conv',
           'tests/test_speed_paths.py::test_the_unet_upsamples_with_it_once_placed')),
    Break('prediction: the fast layers not swapped in', SD,
          'return fast_layers(net).to(device).eval(), ckpt',
          'return net.to(device).eval(), ckpt',
          ('tests/test_speed_paths.py::test_a_checkpoint_loads_into_the_fast_layers_and_back',)),
    # -------------------------------------------------------------------------------------- the upsample
    Break('upsample: the matrix path never taken', SD,
          'if x.is_cuda or self.everywhere:',
          'if False:',
          ('tests/test_speed_paths.py::test_the_unet_takes_the_matrix_upsample_where_asked',)),
    Break('upsample: the matrices wrong', SD,
          'matrix[rows, (low + 1).clamp(max=n - 1)] += frac',
          'matrix[rows, low] += frac',
          ('tests/test_speed_paths.py::test_upsample2x_is_bilinear_align_corners',)),
    # ---------------------------------------------------------------------------------- data on the device
    Break('data on the device: another crop than the streamed one', SD,
          'crops.append(voc_rand_crop(*self.decoded[i], *self.dataset.crop_size))',
          'torch.rand(1)\ncrops.append(voc_rand_crop(*self.decoded[i], *self.dataset.crop_size))',
          ('tests/test_speed_paths.py::test_device_data_gives_the_streaming_batches',)),
    # -------------------------------------------------------------------------------------------- the book's calls
    Break("book's call: train_ch13 wants a checkpoint in devices' place", SD,
          'def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices=None, *, checkpoint=None, '
          'amp=None,',
          'def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, checkpoint, devices=None, amp=None,',
          ('tests/test_book_calls.py',)),
    Break("book's call: load_data_voc's labels keep the void 255 the book's loss cannot take", SD,
          'data = find_data(void_as_background=True) if data is None else data if isinstance(data, DataSource) else \\',
          'data = find_data() if data is None else data if isinstance(data, DataSource) else \\',
          ('tests/test_book_calls.py::test_the_fcn_section',)),
    Break("book's call: several devices, one of them used", SD,
          'net = nn.DataParallel(net, devices)',
          'pass',
          ('tests/test_book_calls.py::test_train_ch13_takes_any_loaders_and_a_device_list',)),
    Break("book's call: train_batch_ch13 does not step the trainer", SD,
          'if step:',
          'if False:',
          ('tests/test_book_calls.py::test_the_book_step_returns_loss_sum_and_correct_pixels_and_steps_the_trainer',)),
    Break("book's call: the book's predict finds no normalize_image on the dataset", SD,
          'def normalize_image(self, img):     # the book\'s predict calls test_iter.dataset.normalize_image(img)',
          'def normalise_image(self, img):',
          ('tests/test_book_calls.py::test_the_fcn_section',)),
    # ------------------------------------------------------------------------------------------------ resume
    Break("resume: the optimizer's state not restored", SD,
          "trainer.load_state_dict(self.state['optimizer'])",
          'pass',
          ('tests/test_reliability.py::test_15_resume_is_exact',)),
    Break("resume: the model's own draws (dropout) not reseeded each epoch", SD,
          'torch.manual_seed(seed_for(run_seed, run_epoch, MODEL_DRAWS))     # the model\'s own (dropout)',
          'pass',
          ('tests/test_faults.py::test_resume_is_exact_with_every_random_draw[dropout]',)),
    Break('resume: CutMix/CopyBlob draw from the global random state, not from (seed, epoch, step)', SD,
          'X, y = augment(X, y, torch.Generator().manual_seed(seed_for(seed, i, rank())))',
          'X, y = augment(X, y, None)',
          ('tests/test_faults.py::test_batch_augmentations_draw_from_the_step_alone',)),
    Break("resume: CutMix's Beta draw from the global random state", SD,
          'lam = np.random.default_rng(_randint(2 ** 62, generator)).beta(alpha, alpha, n)',
          'lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))',
          ('tests/test_faults.py::test_batch_augmentations_draw_from_the_step_alone',)),
    Break("resume: the fine-tune repeats the first stage's epochs (and draws)", SD,
          "run_epoch = ckpt.first_epoch + epoch    # a fine-tune continues the first stage's epochs, and its draws",
          'run_epoch = epoch',
          ('tests/test_faults.py::test_the_fine_tune_draws_other_crops_than_the_first_stage',)),
    Break('restart: the old checkpoint not kept as *.prev.pt', SD,
          'os.replace(self.path, prev)',
          'pass',
          ('tests/test_flags.py::test_a_restart_keeps_the_old_checkpoint_as_prev',)),
    # --------------------------------------------------------------------------------- faults of the machine
    Break('a failed write leaves its partial file', SD,
          'tmp.unlink()',
          'pass',
          ('tests/test_faults.py::test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_resume_continues',)),
    Break("a failed checkpoint save ends in torch's own traceback", SD,
          'except BaseException as err:    # noqa: BLE001 - the partial file goes, whatever stopped the write',
          'except OSError as err:',
          ('tests/test_faults.py::test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_resume_continues',)),
    Break('SIGTERM kills the run without its line', SD,
          'previous, sys.unraisablehook = signal.signal(signal.SIGTERM, raise_terminated), quiet_unraisable',
          'previous, sys.unraisablehook = signal.getsignal(signal.SIGTERM), quiet_unraisable',
          ('tests/test_faults.py::test_sigterm_mid_epoch_stops_like_ctrl_c_and_resume_is_exact',)),
    # ------------------------------------------------------------------------------ the device, without a GPU
    Break("focal's class weights left on the CPU", SD,
          'weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).to(device)',
          'weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)',
          ('tests/test_device_audit.py::test_every_loss_with_and_without_class_weights',)),
    Break('CopyBlob reads the device per sample', SD,
          "holders = [j for j, (_, y1, _, _) in enumerate(boxes.tolist()) if y1]     # the pair's one host read",
          'holders = [j for j in range(n) if int(boxes[j, 1])]',
          ('tests/test_device_audit.py::test_copyblob_reads_the_device_once_per_pair_and_pastes_what_the_cpu_does',)),
    Break('the training loop waits for the device every step', SD,
          'sums = sums + torch.stack([l_sum.double(), correct.double(), (y != IGNORE_INDEX).sum().double()])',
          'sums = sums + torch.stack([l_sum.double(), correct.double(), (y != IGNORE_INDEX).sum().double()]).cpu()',
          ('tests/test_device_audit.py::test_the_training_loop_waits_for_the_device_only_at_the_end_of_an_epoch',)),
    Break("the upsample's half-precision rows no longer sum to 1", SD,
          'frac = (frac * unit).round() / unit',
          'pass',
          ('tests/test_device_audit.py::test_half_precision_matrices_keep_rows_summing_to_one',)),
    # -------------------------------------------------------------------------------- the confusion matrix
    Break('confusion matrix: rows and columns swapped', SD,
          'idx = torch.where(counted, n * target + pred, n * n)        # the pixels not counted: one more bin, dropped',
          'idx = torch.where(counted, n * pred + target, n * n)',
          ('tests/test_core.py::test_confusion_matrix_matches_brute_force',)),
    # ------------------------------------------------------------------------------------------------ CutMix
    Break('CutMix: the label box from another sample than the image box', SD,
          'labels[i, y0:y1, x0:x1] = src_labels[j, y0:y1, x0:x1]',
          'labels[i, y0:y1, x0:x1] = src_labels[(j + 1) % n, y0:y1, x0:x1]',
          ('tests/test_techniques.py::test_cutmix_consistency',)),
    Break('CutMix: never applied in training', SD,
          'X, y = cutmix_segmentation(X, y, cutmix, generator=generator)',
          'pass',
          ('tests/test_flags.py::test_cutmix_changes_the_batch_that_reaches_the_loss',)),
    # ---------------------------------------------------------------------------------------------- CopyBlob
    Break('CopyBlob: the whole box pasted, not the blob', SD,
          'paste = inside & (donor_labels == src) & (pastes & (count > 0)).view(n, 1, 1)',
          'paste = inside & (pastes & (count > 0)).view(n, 1, 1)',
          ('tests/test_techniques.py::test_copyblob_pastes_exact_blob',)),
    Break('CopyBlob: never applied in training', SD,
          'X, y = copyblob(X, y, pairs, copyblob_prob, generator)',
          'pass',
          ('tests/test_flags.py::test_copyblob_changes_the_batch_that_reaches_the_loss',)),
    Break('my_train.py: no batch augmentation reaches train_ch13', 'my_train.py',
          'augment = sd.batch_augment(args.cutmix, args.copyblob, pairs)',
          'augment = None',
          ('tests/test_flags.py::test_cutmix_changes_the_batch_that_reaches_the_loss',
           'tests/test_flags.py::test_copyblob_changes_the_batch_that_reaches_the_loss')),
    # --------------------------------------------------------------------------------------------- the losses
    Break('focal: class weights ignored', SD,
          'weight = 1.0 if self.weight is None else self.weight[safe_target]',
          'weight = 1.0',
          ('tests/test_techniques.py::test_focal_matches_brute_force',)),
    Break('my_train.py: focal without its class weights, gamma 0', 'my_train.py',
          'loss = sd.make_loss(args.loss, weights, args.focal_gamma, device)',
          'loss = sd.make_loss(args.loss, None, 0.0, device)',
          ('tests/test_flags.py::test_focal_with_class_weights_is_the_loss_that_trains',)),
    Break('auxiliary loss: left out of the step', SD,
          'l = l + AUX_WEIGHT * loss(aux, y)',
          'l = l',
          ('tests/test_techniques.py::test_the_training_step_adds_the_auxiliary_loss_at_weight_0_4',)),
    # --------------------------------------------------------------------------------------- accumulation
    Break('accumulation: an update after every micro-batch', SD,
          'last = (i + 1) % accum_steps == 0',
          'last = True',
          ('tests/test_core.py::test_accum_steps_gives_the_same_update_as_the_whole_batch',)),
    # ------------------------------------------------------------------------------------------ DDP scaling
    Break('DDP: gradients averaged, not summed, over the processes', SD,
          '(scaler.scale(l_sum * world) if scaler is not None else l_sum * world).backward()',
          '(scaler.scale(l_sum) if scaler is not None else l_sum).backward()',
          ('tests/test_distributed.py::test_two_processes_train_to_the_weights_of_one',)),
    # ------------------------------------------------------------------------------------------- inference
    Break('multi-scale: one scale only', SD,
          'for s in scales:',
          'for s in (1.0,):',
          ('tests/test_techniques.py::test_multiscale_averages_the_softmax_of_every_scale_and_its_flip',)),
    Break("multi-scale --mst-mode tutorial: probabilities, not the tutorial's raw scores", SD,
          'scores = scores if tutorial else scores.softmax(1)',
          'scores = scores.softmax(1)',
          ('tests/test_techniques.py::'
           'test_multiscale_tutorial_mode_averages_the_raw_scores_resized_with_align_corners',)),
    Break('origin_predict.py: --mst-mode not passed to the evaluation', 'origin_predict.py',
          'sd.evaluate_checkpoint(net, path, val, data.title, scales, amp, args.test_size, args.workers, '
          'args.mst_mode,',
          "sd.evaluate_checkpoint(net, path, val, data.title, scales, amp, args.test_size, args.workers, 'softmax',",
          ('tests/test_flags.py::test_mst_and_scales_through_the_script_beside_single_scale',)),
    Break('origin_predict.py: --mst ignored', 'origin_predict.py',
          'scales = args.scales if args.mst else None',
          'scales = None',
          ('tests/test_flags.py::test_mst_and_scales_through_the_script_beside_single_scale',)),
    Break('origin_predict.py: --test-size not passed to the evaluation', 'origin_predict.py',
          'sd.evaluate_checkpoint(net, path, val, data.title, scales, amp, args.test_size, args.workers, '
          'args.mst_mode,',
          'sd.evaluate_checkpoint(net, path, val, data.title, scales, amp, None, args.workers, args.mst_mode,',
          ('tests/test_flags.py::test_test_size_through_the_script',)),
    # --------------------------------------------------------------------------------------- the scripts' data
    Break('void as background: 255 kept', SD,
          'label[label == IGNORE_INDEX] = 0',
          'pass',
          ('tests/test_flags.py::test_void_as_background_trains_and_evaluates_on_void_pixels',)),
    Break("predict scripts: --void-as-background not taken from the checkpoint", SD,
          "void_as_background or bool(cfg.get('void_as_background')), classes, val_share)",
          'void_as_background, classes, val_share)',
          ('tests/test_flags.py::test_void_as_background_trains_and_evaluates_on_void_pixels',)),
    Break("own data: RGB masks read with VOC's colours", SD,
          'self.label_lut, self.colormap2label = files.label_lut, voc_colormap2label(classes.colors)',
          'self.label_lut, self.colormap2label = files.label_lut, voc_colormap2label()',
          ('tests/test_own_data.py::test_folder_dataset_reads_both_mask_kinds_alike',)),
    Break('Cityscapes: raw ids not mapped to train ids', SD,
          'CITYSCAPES_ID_TO_TRAINID[[c.id for c in CITYSCAPES_TRAIN_CLASSES]] = '
          'torch.arange(len(CITYSCAPES_TRAIN_CLASSES))',
          'CITYSCAPES_ID_TO_TRAINID[[c.id for c in CITYSCAPES_TRAIN_CLASSES]] = '
          'torch.tensor([min(c.id, 18) for c in CITYSCAPES_TRAIN_CLASSES])',
          ('tests/test_cityscapes.py::test_synthetic_label_ids_map_to_train_ids',)),
    Break("Cityscapes: the tutorial's flip moves the image only", SD,
          'image, label = image.flip(-1), label.flip(-1)',
          'image, label = image.flip(-1), label',
          ('tests/test_cityscapes.py::test_synthetic_tutorial_augment_keeps_image_and_label_aligned',)),
    Break("the tutorial's class weights altered", SD,
          '0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]',
          '0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.5070]',
          ('tests/test_cityscapes.py::test_synthetic_training_with_the_tutorials_class_weights',)),
    # ------------------------------------------------------------------------------------------ my_train.py
    Break('fine-tune: starts from fresh weights, not stage 1', 'my_train.py',
          'if args.finetune_epochs:',
          'if args.finetune_epochs:\n    model.load_state_dict(sd.build_model(**model_args).state_dict())',
          ('tests/test_flags.py::test_the_fine_tune_starts_from_stage_1s_weights',)),
    Break('--compile: the compiled wrapper saved', SD,
          'ckpt.start(unwrapped(net), trainer, scaler, num_epochs, len(train_iter.dataset), amp)',
          'ckpt.start(net, trainer, scaler, num_epochs, len(train_iter.dataset), amp)',
          ('tests/test_flags.py::test_a_compiled_run_saves_a_checkpoint_that_loads_without_compile',)),
    Break('--sync-bn: BatchNorm never converted', SD,
          'nn.SyncBatchNorm.convert_sync_batchnorm(model)',
          'pass',
          ('tests/test_flags.py::test_sync_bn_turns_batch_norm_into_sync_batch_norm_under_torchrun_on_gpus',)),
    Break("curves: the fine-tune's start not marked", SD,
          'plot_history(self.earlier + self.history, self.curves, self.title, self.first_epoch)',
          'plot_history(self.earlier + self.history, self.curves, self.title)',
          ('tests/test_scripts.py::test_training_curves',)),
    Break('Cityscapes predictions without their label ids', SD,
          'if classes == CITYSCAPES else []',
          'if False else []',
          ('tests/test_cityscapes.py::test_synthetic_predictions_in_the_official_format',)),
    Break('masks saved as 0/255 train without a word', SD,
          'if missing and share >= 0.01:      # 1% or more of the training pixels ignored',
          'if False:',
          ('tests/test_own_data.py::test_masks_saved_as_0_255_are_named_before_training',)),
    Break("curves: the fine-tune's picture without stage 1's epochs", SD,
          'plot_history(self.earlier + self.history, self.curves, self.title, self.first_epoch)',
          'plot_history(self.history, self.curves, self.title, self.first_epoch)',
          ('tests/test_scripts.py::test_training_curves',)),
    Break('--demo: its recipe not applied', SD,
          'parser.set_defaults(**demo)',
          'pass',
          ('tests/test_scripts.py::test_the_readmes_first_command',)),
    # ---------------------------------------------------------------------------------------- my_predict.py
    Break('--compare: a checkpoint of other classes kept', 'my_predict.py',
          'if sd.checkpoint_classes(c) == data.classes:',
          'if True:',
          ('tests/test_flags.py::test_compare_columns_and_a_checkpoint_of_other_classes_left_out',)),
    Break('--write-split ignored', 'my_predict.py',
          'if args.write_split:',
          'if False:',
          ('tests/test_flags.py::test_write_split_segments_every_val_image',)),
    # --- issue 19: weights files
    Break('weights: a --backbone-weights FILE dropped by the --demo recipe', SD,
          'args.pretrained = True',
          'pass',
          ('tests/test_weights.py::test_a_weights_file_named_with_demo_is_used',)),
    Break('weights files: the published files refused (the counters they lack required)', SD,
          "needed = {k for k in expected if not k.endswith('.num_batches_tracked')}",
          'needed = set(expected)',
          ('tests/test_weights.py::test_the_published_resnet18_loads_from_every_place',)),
    Break('weights files: every -<hex digits> name taken for a hash', SD,
          'if path.name not in published or not match or not path.is_file():     # a folder: load_torch_file says so',
          'if not match or not path.is_file():',
          ('tests/test_weights.py::test_a_users_file_name_is_no_hash',)),
    Break("weights files: the download read by torch.hub's unpickler", SD,
          "state = load_torch_file(path, f'{arch} weights file', advice)",
          'state = torch.load(path, weights_only=False)',
          ('tests/test_weights.py::test_a_download_that_is_not_weights_stops_in_one_line',)),
    # --- issue 19: the download
    Break('download: a .part holding a web page continued after it', SD,
          'if not opens_a_tar(f.read(262)):     # a web page: nothing worth continuing',
          'if False:',
          ('tests/test_download.py::test_a_part_that_is_a_web_page_is_not_continued',)),
    Break('download: a 416 or a 206 of other bytes not asked again from byte 0', SD,
          'response.close()',
          "raise ConnectionError(f'HTTP {response.status}')",
          ('tests/test_download.py::test_a_range_the_server_does_not_continue_starts_again_from_byte_0',)),
    Break('download: a web page or an unannounced non-tar body kept as the .part', SD,
          'if not have and not opens_a_tar(chunk):',
          'if False:',
          ('tests/test_download.py::test_a_web_page_answered_200_is_not_kept',)),
    Break('download: a body of another length than the tar kept', SD,
          'if length is not None and length != size:          # another file: not worth 2 GB of disk',
          'if False:',
          ('tests/test_download.py::test_a_body_of_another_length_than_the_tar_is_not_kept',)),
    Break('download: an http.client error ends the download instead of trying the next source', SD,
          'except (OSError, http.client.HTTPException) as err:    # refused, HTTP error, timeout, cut, not HTTP',
          'except OSError as err:',
          ('tests/test_download.py::test_http_errors_and_malformed_headers_move_on_to_the_next_source',)),
    Break('download: a complete leftover .part asked for again, not checked first', SD,
          "if part.exists() and part.stat().st_size >= checksums['size']:    # a run killed while checking it",
          'if False:',
          ('tests/test_download.py::test_a_complete_good_part_is_not_asked_for_again',
           'tests/test_download.py::test_a_complete_leftover_part_that_fails_is_deleted_and_the_first_source_used')),
    Break('download: no lock, two runs on one folder collide', SD,
          'fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)',
          'pass',
          ('tests/test_download.py::test_two_downloads_of_one_folder_take_turns',)),
    Break('download: the dataset already there not looked for first', SD,
          'voc = find_voc_dir(data_dir, missing_ok=download)',
          'voc = None if download else find_voc_dir(data_dir)',
          ('tests/test_download.py::test_download_uses_the_dataset_already_there',)),
    Break('download: the checksums hash only the first MiB', SD,
          "for block in iter(lambda: f.read(1 << 20), b''):",
          'for block in [f.read(1 << 20)]:',
          ('tests/test_download.py::test_the_checksums_cover_the_whole_file',)),
    # --- issue 19: your own data as tools export it
    Break("EXIF orientation ignored: a phone's portrait photo read as its stored landscape pixels", SD,
          'ImageOps.exif_transpose(img, in_place=True)',
          'pass',
          ('tests/test_own_data.py::test_phone_photos_are_read_as_shown',)),
    Break("the crop's size check judges a phone's photo by its stored pixels", SD,
          'w, h = img.size[::-1] if quarter_turn(img) else img.size',
          'w, h = img.size',
          ('tests/test_own_data.py::test_phone_photos_are_read_as_shown',)),
    Break("CVAT's labelmap.txt read as a plain class file", SD,
          "labelmap = not csv and all(line.count(':') == 3 for line in lines if line and not line.startswith('#'))",
          'labelmap = False',
          ('tests/test_own_data.py::test_labelmap_lines_are_checked',
           'tests/test_own_data.py::test_a_cvat_export_trains_as_exported')),
    Break("a CVAT export's labelmap.txt not looked for: VOC's classes", SD,
          "classes = classes or (root / 'labelmap.txt' if (root / 'labelmap.txt').exists() else None)",
          'classes = classes',
          ('tests/test_own_data.py::test_a_cvat_export_trains_as_exported',)),
    Break('--val-share: the share held out for training instead of val', SD,
          'return [name for i, name in enumerate(ids) if (i in held) != is_train]',
          'return [name for i, name in enumerate(ids) if (i in held) == is_train]',
          ('tests/test_own_data.py::test_a_cvat_export_without_subsets_holds_a_seeded_share_out',
           'tests/test_labelme.py::test_a_labelme_export_reads_as_written')),
    # --- issue 21
    # -------------------------------------------------------------------- a checkpoint is on disk before it counts
    Break('durable write: the temporary file not fsynced before the rename', SD,
          'os.fsync(f.fileno())    # the data on disk before the name points at it',
          'pass',
          ('tests/test_guards.py::test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one',)),
    Break('durable write: the temporary file fsynced with bytes still buffered', SD,
          'f.flush()',
          'pass',
          ('tests/test_guards.py::test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one',)),
    Break("durable write: the folder's entry not fsynced after the rename", SD,
          'sync_folder(path.parent)    # and the name on disk: a checkpoint is durable before the run goes on',
          'pass',
          ('tests/test_guards.py::test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one',)),
    Break("durable write: a filesystem that refuses a folder's fsync stops the run", SD,
          'if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):',
          'if True:',
          ('tests/test_guards.py::test_a_folder_that_cannot_be_fsynced_is_skipped_quietly',)),
    Break('durable write: a folder that cannot be opened (Windows) stops the run', SD,
          'except OSError:     # Windows: a folder is not a file to open',
          'except FileNotFoundError:',
          ('tests/test_guards.py::test_a_folder_that_cannot_be_fsynced_is_skipped_quietly',)),
    # ---------------------------------------------------------------------------------------- resume's guards
    Break('resume: a checkpoint of other model flags (--norm) continued', SD,
          "if self.state.get('model_args') != model_args:",
          'if False:',
          ('tests/test_guards.py::test_resume_with_other_model_flags_is_refused',
           'tests/test_guards.py::test_resume_with_another_norm_through_the_script')),
    Break("resume: fp16's GradScaler state not restored", SD,
          "scaler.load_state_dict(self.state['scaler'])",
          'pass',
          ('tests/test_guards.py::test_an_fp16_run_resumes_with_its_grad_scalers_scale_and_growth_tracker',)),
    Break("resume: fp16's GradScaler state not saved", SD,
          'scaler=scaler.state_dict() if scaler is not None else None)',
          'scaler=None)',
          ('tests/test_guards.py::test_an_fp16_run_resumes_with_its_grad_scalers_scale_and_growth_tracker',)),
    Break('resume: a stage whose checkpoint does not exist yet (the fine-tune) is refused', SD,
          'self.resuming = resume and self.path is not None and self.path.exists()',
          'self.resuming = resume and self.path is not None',
          ('tests/test_guards.py::test_resume_after_a_stop_in_stage_1_finishes_it_then_fine_tunes_from_it',)),
    Break('my_train.py --resume: the fine-tune skipped', 'my_train.py',
          'if args.finetune_epochs:',
          'if args.finetune_epochs and not args.resume:',
          ('tests/test_guards.py::test_resume_after_a_stop_in_stage_1_finishes_it_then_fine_tunes_from_it',)),
    # ------------------------------------------------------------------------------------- masks and counts
    Break('a mask value equal to the number of classes accepted', SD,
          'bad = ((label < 0) | (label >= num_classes)) & (label != IGNORE_INDEX)',
          'bad = ((label < 0) | (label > num_classes)) & (label != IGNORE_INDEX)',
          ('tests/test_guards.py::test_a_mask_value_equal_to_the_number_of_classes_is_named_at_load',)),
    Break('cached class counts: --void-as-background reads the counts of the other setting', SD,
          'key = json.dumps([dataset.classes, masks, dataset.void_as_background, dataset.label_lut is not None,',
          'key = json.dumps([dataset.classes, masks, dataset.label_lut is not None,',
          ('tests/test_guards.py::test_cached_class_counts_follow_void_as_background',)),
    Break('cached class counts: an edited mask not counted again', SD,
          'masks = [(str(p), s.st_size, s.st_mtime_ns) for p, s in ((p, Path(p).stat()) for _, p in dataset.items)]',
          'masks = [str(p) for _, p in dataset.items]',
          ('tests/test_guards.py::test_cached_class_counts_follow_an_edited_mask_and_the_classes',)),
    # ------------------------------------------------------------------------------------------ my_predict.py
    Break('my_predict.py: --test-size not passed to the evaluation', 'my_predict.py',
          'sd.evaluate_checkpoint(n, p, val, data.title, scales, amp, args.test_size, args.workers, args.mst_mode,',
          'sd.evaluate_checkpoint(n, p, val, data.title, scales, amp, None, args.workers, args.mst_mode,',
          ('tests/test_guards.py::test_my_predict_evaluates_at_the_test_size',)),
    Break('my_predict.py: photos segmented at one scale despite --mst', 'my_predict.py',
          'sd.segment_files(net, sd.image_files(args.inputs), args.out_dir, sd.checkpoint_classes(ckpt), scales, amp,',
          'sd.segment_files(net, sd.image_files(args.inputs), args.out_dir, sd.checkpoint_classes(ckpt), None, amp,',
          ('tests/test_guards.py::test_my_predict_segments_photos_at_every_scale_with_the_flip',)),
    Break("segmenting files: the scales not passed to predict", SD,
          'pred = predict(net, image, scales, test_size, mst_mode, tiling)',
          'pred = predict(net, image, None, test_size, mst_mode, tiling)',
          ('tests/test_guards.py::test_my_predict_segments_photos_at_every_scale_with_the_flip',)),
    Break('multi-scale: no flipped pass', SD,
          'for flipped in ((False, True) if flip else (False,)):',
          'for flipped in (False,):',
          ('tests/test_guards.py::test_my_predict_segments_photos_at_every_scale_with_the_flip',)),
    # ------------------------------------------------------------------------------------------------ torchrun
    Break("torchrun: a batch the processes cannot share trains a smaller one", SD,
          'if batch_size % (accum_steps * world_size()):',
          'if batch_size % accum_steps:',
          ('tests/test_guards.py::test_a_batch_the_processes_cannot_share_is_refused',
           'tests/test_guards.py::test_the_scripts_refuse_such_a_batch_before_starting_processes')),
    # ---------------------------------------------------------------------------------------- --seed, every draw
    Break('--seed: not passed to the sampler (batch order and crops of seed 0)', SD,
          'sampler = SeededSampler(dataset, shuffle=is_train, seed=seed, eval_limit=len(dataset) // batch_size * '
          'batch_size)',
          'sampler = SeededSampler(dataset, shuffle=is_train, seed=0, eval_limit=len(dataset) // batch_size * '
          'batch_size)',
          ('tests/test_guards.py::test_two_seeds_give_other_batch_orders_and_crops',)),
    Break('--seed: the crops ignore it', SD,
          'gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, CROP_DRAWS))',
          'gen = torch.Generator().manual_seed(seed_for(0, self.epoch, CROP_DRAWS))',
          ('tests/test_guards.py::test_two_seeds_give_other_batch_orders_and_crops',)),
    Break("--seed: the model's own draws (dropout) ignore it", SD,
          'torch.manual_seed(seed_for(run_seed, run_epoch, MODEL_DRAWS))     # the model\'s own (dropout)',
          'torch.manual_seed(seed_for(0, run_epoch, MODEL_DRAWS))',
          ('tests/test_guards.py::test_two_seeds_give_other_dropout_and_batch_augmentation_draws',)),
    Break("--seed: the epoch's CutMix/CopyBlob seed ignores it", SD,
          'seed_for(run_seed, run_epoch, AUGMENT_DRAWS))',
          'seed_for(0, run_epoch, AUGMENT_DRAWS))',
          ('tests/test_guards.py::test_two_seeds_give_other_dropout_and_batch_augmentation_draws',)),
    Break("--seed: each step's CutMix/CopyBlob draws ignore the epoch's seed", SD,
          'X, y = augment(X, y, torch.Generator().manual_seed(seed_for(seed, i, rank())))',
          'X, y = augment(X, y, torch.Generator().manual_seed(seed_for(i, rank())))',
          ('tests/test_guards.py::test_two_seeds_give_other_cutmix_and_copyblob_draws',)),
    # ------------------------------------------------------------------------------------------ README and docs
    Break('readme: a command with a flag no script has', 'README.md',
          'python my_train.py --dataset folder --data-dir mydata --crop-size 320 480   # add --no-pretrained when '
          'offline',
          'python my_train.py --dataset folder --data-dir mydata --crop-size 320 480 --crops 2',
          ('tests/test_readme.py::test_readme_commands_parse_with_each_scripts_parser[README.md]',)),
    Break('readme: a docs command with a bad choice', 'docs/techniques.md',
          'python my_predict.py --checkpoint checkpoints/city.pt --eval --mst',
          'python my_predict.py --checkpoint checkpoints/city.pt --eval --mst --mst-mode mean',
          ('tests/test_readme.py::test_readme_commands_parse_with_each_scripts_parser[docs/techniques.md]',)),
    Break("readme: a script's --help fails", 'origin_predict.py',
          'sd.add_predict_args(parser, CHECKPOINT, PICTURE)',
          "sd.add_predict_args(parser, CHECKPOINT, PICTURE)\nparser.add_argument('--x', help='%(nothing)s')",
          ('tests/test_readme.py::test_readme_every_script_help_exits_0[origin_predict.py]',)),
    Break('readme: the first command is not what test_scripts runs', 'README.md',
          'pip install -r requirements.txt && python origin_train.py --demo && python origin_predict.py && python '
          'my_train.py --demo && python my_predict.py --eval',
          'pip install -r requirements.txt && python origin_train.py --demo --crop-size 64 64 && python '
          'origin_predict.py && python my_train.py --demo && python my_predict.py --eval',
          ('tests/test_scripts.py::test_the_readmes_first_command',)),
    Break('readme: the Chinese quick start gives another first command', 'README.zh-CN.md',
          'pip install -r requirements.txt && python origin_train.py --demo && python origin_predict.py && python '
          'my_train.py --demo && python my_predict.py --eval',
          'pip install -r requirements.txt && python origin_train.py --demo && python my_train.py --demo && python '
          'my_predict.py --eval',
          ('tests/test_readme.py::test_readme_first_command_is_the_demo_and_the_same_in_chinese',)),
    Break('readme: --demo folder trains on the VOC demo', SD,
          "folder = demo == 'folder' or kind == 'folder'",
          "folder = kind == 'folder'",
          ('tests/test_readme.py::test_readme_own_data_demo_runs',)),
    Break('readme: over 250 lines', 'README.md',
          '- [docs/development.md](docs/development.md): the tests, the GPU tests, the mutation run, the benchmark.',
          '- [docs/development.md](docs/development.md): the tests, the GPU tests, the mutation run, the benchmark.'
          + '\n' * 260,
          ('tests/test_readme.py::test_readme_is_at_most_250_lines',)),
    Break('readme: a dead link', 'README.md',
          '- [docs/reliability.md](docs/reliability.md): checkpoints, `--resume`, Ctrl-C and SIGTERM, full disks, bad '
          'input.',
          '- [docs/reliability.md](docs/reliable.md): checkpoints, `--resume`, Ctrl-C and SIGTERM, full disks, bad '
          'input.',
          ('tests/test_readme.py::test_readme_relative_links_point_to_files[README.md]',)),
    Break('readme: a dead anchor', 'docs/data-and-weights.md',
          'The layouts are in the [README](../README.md#my-own-data). Beyond them:',
          'The layouts are in the [README](../README.md#own-data). Beyond them:',
          ('tests/test_readme.py::test_readme_relative_links_point_to_files[docs/data-and-weights.md]',)),
    Break('flags: a flag docs/flags.md does not name', 'docs/flags.md',
          '| `--sync-bn` | train | off | under torchrun on GPUs: SyncBatchNorm |',
          '',
          ('tests/test_scripts.py::test_help_mentions_every_flag[script0-flags0]',)),
    # --- issue 26 item 1: --init-from FILE
    Break('init-from: the shape check dropped (a head of other classes fails to load)', SD,
          'fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}',
          'fits = {k: v for k, v in state.items() if k in own}',
          ('tests/test_init_from.py::test_a_checkpoint_of_other_classes_starts_a_run_that_trains',
           'tests/test_init_from.py::test_torchvisions_coco_file_into_other_classes')),
    Break('init-from: the tensors left of another class count not logged', SD,
          "left.append(f'{short_names(reshaped)} ({why})')",
          'pass',
          ('tests/test_init_from.py::test_torchvisions_coco_file_into_other_classes',)),
    Break('init-from: the tensors the file lacks not logged', SD,
          "left.append(f'{short_names(absent)} (not in the file)')",
          'pass',
          ('tests/test_init_from.py::test_tensors_the_file_lacks_are_left_and_named',)),
    Break('init-from: the contradiction with --resume not refused', SD,
          "if getattr(args, 'init_from', None) and args.resume:",
          'if False:',
          ('tests/test_init_from.py::test_init_from_with_resume_or_backbone_weights_contradicts',)),
    Break('init-from: the contradiction with --backbone-weights not refused', SD,
          "if getattr(args, 'init_from', None) and args.backbone_weights:",
          'if False:',
          ('tests/test_init_from.py::test_init_from_with_resume_or_backbone_weights_contradicts',)),
    Break("init-from: another model's file trains from scratch", SD,
          "if all(k.endswith('.num_batches_tracked') for k in fits):   # BatchNorm's counters alone hold no weights",
          'if False:',
          ('tests/test_init_from.py::test_a_file_of_another_model_is_one_line',)),
    Break("init-from: a wrong file under torchvision's name not hash-checked", SD,
          "check_named_hash(path, 'drop --init-from')",
          'pass',
          ('tests/test_init_from.py::test_a_wrong_file_under_the_published_name_is_refused',)),
    Break('init-from: the ImageNet backbone still wanted (my_train.py)', 'my_train.py',
          'model = sd.build_model(**model_args, pretrained=args.pretrained and not (ckpt.resuming or args.init_from),',
          'model = sd.build_model(**model_args, pretrained=args.pretrained and not ckpt.resuming,',
          ('tests/test_init_from.py::test_torchvisions_coco_file_with_its_21_classes',)),
    Break('init-from: the ImageNet backbone still wanted (origin_train.py)', 'origin_train.py',
          'model = sd.fcn_resnet18(num_classes, args.pretrained and not (ckpt.resuming or args.init_from),',
          'model = sd.fcn_resnet18(num_classes, args.pretrained and not ckpt.resuming,',
          ('tests/test_init_from.py::test_a_checkpoint_of_other_classes_starts_a_run_that_trains',)),
    Break('init-from: the file not loaded (my_train.py)', 'my_train.py',
          "sd.init_from(model, args.init_from, args.model, model_args['num_classes'])",
          'pass',
          ('tests/test_init_from.py::test_a_checkpoint_of_the_same_classes_leaves_nothing',)),
    Break('init-from: not in the recipe title', SD,
          "extras += [f'from {Path(config[\"init_from\"]).name}'] if config.get('init_from') else []",
          'pass',
          ('tests/test_init_from.py::test_a_checkpoint_of_other_classes_starts_a_run_that_trains',)),
    # issue 26 item 4: Dice loss
    Break('dice: void pixels counted in the predictions\' sums', SD,
          'p = p * valid.unsqueeze(1)',
          'p = p',
          ('tests/test_dice.py::test_dice_is_smps_dice_loss_on_the_same_tensors',
           'tests/test_dice.py::test_void_pixels_are_in_neither_sum')),
    Break('dice: class weights ignored', SD,
          'return loss.mean() if weight is None else (loss * weight).sum() / weight.sum()',
          'return loss.mean()',
          ('tests/test_dice.py::test_dice_is_smps_dice_loss_on_the_same_tensors',)),
    Break('dice: computed in the autocast dtype', SD,
          'p = logits.float().log_softmax(1).exp()',
          'p = logits.log_softmax(1).exp()',
          ('tests/test_dice.py::test_fp32_under_autocast',)),
    Break('dice: classes absent from the batch counted as missed', SD,
          'loss = (1.0 - dice) * (labelled > 0)',
          'loss = 1.0 - dice',
          ('tests/test_dice.py::test_dice_is_smps_dice_loss_on_the_same_tensors',)),
    Break('dice: ce+dice without its cross entropy', SD,
          "return dice + cross_entropy_loss(inputs, targets, weight) if name == 'ce+dice' else dice",
          'return dice',
          ('tests/test_dice.py::test_the_per_example_forms_the_training_step_sums',)),
    Break('dice: the batch Dice split among its examples', SD,
          'dice = dice_loss(inputs, targets, weight).expand(inputs.shape[0])',
          'dice = dice_loss(inputs, targets, weight).expand(inputs.shape[0]) / inputs.shape[0]',
          ('tests/test_dice.py::test_the_per_example_forms_the_training_step_sums',)),
    Break('dice: my_train.py --class-weights does not reach dice', 'my_train.py',
          "if args.loss == 'weighted_ce' or (args.loss in WEIGHTED_LOSSES and args.class_weights):",
          "if args.loss == 'weighted_ce' or (args.loss == 'focal' and args.class_weights):",
          ('tests/test_dice.py::test_my_train_trains_with_weighted_ce_plus_dice',)),
    # issue 26 item 7: labelme's layout
    Break('labelme: the layout not detected', SD,
          'if data_dir is not None and not download and is_labelme(data_dir):',
          'if False:',
          ('tests/test_labelme.py::test_a_labelme_export_trains_and_predicts_with_data_dir_alone',)),
    Break('labelme: __ignore__ (-1, 255 in the PNGs) taken for a class', SD,
          "names = ['background' if n == '_background_' else n for n in names if n and n != '__ignore__']",
          "names = ['background' if n == '_background_' else n for n in names if n]",
          ('tests/test_labelme.py::test_an_ignore_line_in_class_names_is_no_class',)),
    Break('labelme: -1 (255 in the PNGs) mapped to background', SD,
          "return SplitFiles(items, labels, 'move it and its pair away')",
          "return SplitFiles(items, labels, 'move it and its pair away', torch.arange(256) % 255)",
          ('tests/test_labelme.py::test_a_labelme_export_reads_as_written',)),
    Break('labelme: the val split not held out', SD,
          'for name in held_out(names, is_train, val_share, labels)]',
          'for name in names]',
          ('tests/test_labelme.py::test_a_labelme_export_reads_as_written',)),
    Break('labelme: the older SegmentationClassPNG/ not looked for', SD,
          'labels = labels if labels.is_dir() else root / \'SegmentationClass\'',
          "labels = root / 'SegmentationClass'",
          ('tests/test_labelme.py::test_a_labelme_export_reads_as_written',)),
    Break('labelme: the held-out share drawn from --seed', SD,
          'held = set(np.random.default_rng(0).choice(len(ids), k, replace=False).tolist())',
          'held = set(np.random.default_rng().choice(len(ids), k, replace=False).tolist())',
          ('tests/test_labelme.py::test_a_labelme_export_reads_as_written',)),
    # ------------------------------------------------------------------------ issue 26, items 5 and 6: --keep-best, --resume
    Break('keep-best: the best copy not written when the mIoU improves', SD,
          'if improved and self.best_path is not None:',
          'if False:',
          ('tests/test_resume_best.py::test_the_best_copy_follows_strict_improvements_of_the_miou',)),
    Break('keep-best: a tie counted as an improvement (>= for >)', SD,
          "improved = math.isfinite(miou) and (best is None or miou > best['test_miou'])",
          "improved = math.isfinite(miou) and (best is None or miou >= best['test_miou'])",
          ('tests/test_resume_best.py::test_the_best_copy_follows_strict_improvements_of_the_miou',)),
    Break('keep-best: resume_best not mending a stop between the writes', SD,
          'self.resume_best()',
          'pass',
          ('tests/test_resume_best.py::test_a_stop_between_the_two_writes_is_mended_by_the_resume',)),
    Break('resume: a refused key moved to the allowed ones', SD,
          "RESUME_MAY_CHANGE = ('workers', 'device', 'data_on_device', 'channels_last', 'cudnn_benchmark', 'compile',",
          "RESUME_MAY_CHANGE = ('optimizer', 'amp', 'workers', 'device', 'data_on_device', 'channels_last', "
          "'cudnn_benchmark', 'compile',",
          ('tests/test_resume_best.py::test_resume_changes_refuses_by_default', 'tests/test_resume_best.py::test_what_breaks_an_exact_resume_is_refused')),
    Break('resume: the allowed-change line not logged', SD,
          'if say and (moved or predates):',
          'if False:',
          ('tests/test_resume_best.py::test_check_resume_names_every_refused_flag_in_one_line',)),
    Break('resume: check_resume not called', SD,
          'check_resume(self.path, self.state, config)',
          'pass',
          ('tests/test_resume_best.py::test_sgd_resumed_as_adam_is_refused_before_any_state_is_loaded',)),
    Break('resume: a stage shortened below the epochs it finished', SD,
          'allowed = allowed and now >= finished',
          'pass',
          ('tests/test_resume_best.py::test_a_stage_may_extend_itself_not_shorten_or_change_its_base',)),
    Break("resume: a key the checkpoint lacks taken as this run's value, not the flag's default", SD,
          'was, now = saved_config.get(key, defaults.get(key, missing)), config.get(key, missing)',
          'was, now = saved_config.get(key, config.get(key, missing)), config.get(key, missing)',
          ('tests/test_resume_best.py::test_a_key_the_checkpoint_lacks_is_the_flag_default',)),
    Break('resume: the fine-tune not checked before the first stage trains on', 'my_train.py',
          "sd.check_later_stage(sd.finetune_path(args.save), dict(config, stage='finetune'))",
          'pass',
          ('tests/test_resume_best.py::test_a_fine_tune_refuses_a_longer_first_stage_before_it_trains',)),
    Break('resume: the effective mixed precision not compared', SD,
          "if self.resuming and self.state.get('autocast', autocast_name) != autocast_name:",
          'if False:',
          ('tests/test_resume_best.py::test_the_effective_mixed_precision_is_compared',)),
    # --- issue 26 items 1 and 6 together: a resumed --init-from run
    Break('resume: how an --init-from run started not kept (its resume refused)', SD,
          "RESUME_KEEPS = ('init_from',)", 'RESUME_KEEPS = ()',
          ('tests/test_init_from.py::test_a_checkpoint_of_other_classes_starts_a_run_that_trains',)),
    # ------------------------------------------------------------------------- issue 26 item 3: the ONNX export
    Break('onnx: dynamic axes dropped (the second size fails)', SD,
          "input_names=['image'], output_names=['logits'], dynamic_shapes=dims)",
          "input_names=['image'], output_names=['logits'])",
          ('tests/test_onnx.py::test_onnxruntime_gives_pytorchs_logits_at_any_batch_and_size[fcn]',)),
    Break('onnx: the normalisation not in the graph', SD,
          'return predict_scores(self.net, normalize_image(image))',
          'return predict_scores(self.net, image)',
          ('tests/test_onnx.py::test_onnxruntime_gives_pytorchs_logits_at_any_batch_and_size[fcn]',)),
    Break('onnx: the aux head left in (the whole output exported)', SD,
          'return predict_scores(self.net, normalize_image(image))',
          'return self.net(normalize_image(image))',
          ('tests/test_onnx.py::test_one_input_one_output_all_dynamic_no_aux_head_and_the_books_layers'
           '[deeplabv3_resnet50]',)),
    Break('onnx: the speed layers exported', SD,
          'program = torch.onnx.export(ImageToLogits(net).eval(), (torch.rand(ONNX_EXAMPLE),), dynamo=True,',
          'program = torch.onnx.export(ImageToLogits(fast_layers(net)).eval(), (torch.rand(ONNX_EXAMPLE),), '
          'dynamo=True,',
          ('tests/test_onnx.py::test_one_input_one_output_all_dynamic_no_aux_head_and_the_books_layers[fcn]',)),
    Break('onnx: no atomic write', SD,
          "write_atomically(onnx_path, lambda f: f.write(model), 'pass --export-onnx a path in a writable folder')",
          'Path(onnx_path).write_bytes(model)',
          ('tests/test_onnx.py::test_a_full_disk_leaves_no_partial_file_and_the_old_one_whole',)),
    Break('onnx: a file that differs from PyTorch written', SD,
          'if worst > ONNX_TOLERANCE * scale:',
          'if False:',
          ('tests/test_onnx.py::test_a_file_that_differs_from_pytorch_is_not_written',)),
    Break('onnx: the padding in a form symbolic sizes cannot see as multiples (the U-Net does not export)', SD,
          'ph, pw = ((side + NET_STRIDE - 1) // NET_STRIDE * NET_STRIDE for side in (h, w))',
          'ph, pw = (side + -side % NET_STRIDE for side in (h, w))',
          ('tests/test_onnx.py::test_onnxruntime_gives_pytorchs_logits_at_any_batch_and_size[resnet_unet]',)),
    # ---------------------------------------------------------------- issue 26 item 2: sliding-window prediction
    Break('tiles: the count map not divided (scores summed, not averaged)', SD,
          'yield held[..., :below - y, :] / (count_h[y:below, None] * count_w)',
          'yield held[..., :below - y, :]',
          ('tests/test_tiles.py::'
           'test_tiles_are_mmsegmentations_slide_mode_and_the_whole_image_at_the_windows_interior',
           'tests/test_tiles.py::test_tiles_compose_with_multi_scale_and_the_flip_and_with_the_test_size')),
    Break('tiles: the border window not shifted back', SD,
          'return [min(start, last) for start in range(0, last + stride, stride)]',
          'return list(range(0, last + stride, stride))',
          ('tests/test_tiles.py::test_window_starts_cover_the_side_and_the_last_ends_at_the_border',)),
    Break('tiles: the automatic switch off', SD,
          "return self.mode == 'on' or (self.mode == 'auto' and h * w > TILE_ABOVE_PIXELS)",
          "return self.mode == 'on'",
          ('tests/test_tiles.py::test_the_automatic_switch_tiles_above_the_threshold_only',
           'tests/test_tiles.py::test_my_predict_tiles_a_photo_over_the_threshold_and_not_with_whole_image')),
    Break('tiles: the overlap ignored (windows side by side)', SD,
          'return tuple(max(1, math.floor(side * (1 - self.overlap))) for side in self.size)',
          'return tuple(self.size)',
          ('tests/test_tiles.py::'
           'test_tiles_are_mmsegmentations_slide_mode_and_the_whole_image_at_the_windows_interior',
           'tests/test_tiles.py::'
           'test_an_overlap_of_zero_puts_windows_side_by_side_and_more_overlap_means_more_windows')),
    Break('tiles: --whole-image ignored', SD,
          "mode = 'off' if whole_image else 'on' if tile else 'auto'",
          "mode = 'on' if tile else 'auto'",
          ('tests/test_tiles.py::test_predict_tiling_from_the_flags',
           'tests/test_tiles.py::test_my_predict_tiles_a_photo_over_the_threshold_and_not_with_whole_image')),
    Break('tiles: --eval evaluates whole images despite --tile', SD,
          'preds = predict(net, images, scales, test_size, mst_mode, tiling)',
          'preds = predict(net, images, scales, test_size, mst_mode)',
          ('tests/test_tiles.py::test_tile_flag_tiles_every_image_and_eval_counts_the_tiled_labels',)),
    Break('tiles: the rows carried to the next band dropped', SD,
          'carried = held[..., below - y:, :]',
          'carried = held[..., below - y:, :] * 0',
          ('tests/test_tiles.py::'
           'test_tiles_are_mmsegmentations_slide_mode_and_the_whole_image_at_the_windows_interior',)),
    Break('tiles: my_predict.py reads no tiling flag', 'my_predict.py',
          "tiling = sd.predict_tiling(ckpt['config'], args.tile, args.tile_overlap, args.whole_image)",
          'tiling = None',
          ('tests/test_tiles.py::test_my_predict_tiles_a_photo_over_the_threshold_and_not_with_whole_image',)),
    Break('tiles: the uint8 overlay rounds otherwise than torchvision draws', SD,
          'return (a >> 1) + (b >> 1) + (a & b & 1)',
          'return (a >> 1) + (b >> 1)',
          ('tests/test_tiles.py::test_the_overlay_is_torchvisions_draw_segmentation_masks_at_half_alpha',)),
    Break("onnx: the README's snippet feeds 0-255 (its / 255 dropped)", 'README.md',
          "x = np.asarray(Image.open('photo.jpg').convert('RGB'), dtype=np.float32).transpose(2, 0, 1)[None] / 255",
          "x = np.asarray(Image.open('photo.jpg').convert('RGB'), dtype=np.float32).transpose(2, 0, 1)[None]",
          ('tests/test_onnx.py::test_the_readmes_snippet_segments_a_photo_without_pytorch',)),
]


def repository_files():
    """Tracked files and untracked ones git does not ignore (new tests not yet committed), relative to ROOT."""
    out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return sorted({p for p in out.split('\0') if p and (ROOT / p).is_file()})


def copy_repository(files, dest):
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def find_line(lines, b):
    """The index of the one line whose stripped text is b.line; LookupError if there is not exactly one."""
    hits = [i for i, text in enumerate(lines) if text.strip() == b.line.strip()]
    if len(hits) != 1:
        raise LookupError(f'{b.file}: the line {b.line!r} is found {len(hits)} times (expected once): the code '
                          'moved, update this break')
    return hits[0]


def apply_break(copy, b):
    """Replaces the line b.line of b.file in the copy by b.broken, with the line's indentation."""
    path = copy / b.file
    lines = path.read_text().split('\n')
    i = find_line(lines, b)
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    lines[i:i + 1] = [indent + part for part in b.broken.split('\n')]
    path.write_text('\n'.join(lines))


def run_tests(copy, tests, timeout):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    env.pop('PYTHONPATH', None)
    cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'timeout', ''
    return proc.returncode, proc.stdout + proc.stderr


def summary_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(('FAILED', 'ERROR'))]
    return (failed[0] if failed else lines[-1] if lines else '(no output)')[:160]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', help='run only the breaks whose names contain one of these words')
    parser.add_argument('--list', action='store_true', help='list the breaks and their tests')
    parser.add_argument('--timeout', type=int, default=600, help='seconds for one break\'s tests (default: 600)')
    args = parser.parse_args()
    breaks = [b for b in BREAKS if not args.names or any(n.lower() in b.name.lower() for n in args.names)]
    if args.list or not breaks:
        missing = 0
        for b in breaks:
            try:
                where = f'line {find_line((ROOT / b.file).read_text().split(chr(10)), b) + 1}'
            except LookupError as err:
                where, missing = f'NOT FOUND: {err}', missing + 1
            print(f'{b.name}\n    {b.file} ({where}): {b.line}\n    -> {b.broken!r}\n    ' + '\n    '.join(b.tests))
        return 0 if breaks and not missing else 2
    start, files = time.time(), repository_files()
    results = []
    with tempfile.TemporaryDirectory(prefix='mutations_') as tmp:
        clean = Path(tmp) / 'clean'
        copy_repository(files, clean)
        if (ROOT.parent / 'shared').is_dir():       # the real samples beside the copies, as beside the repository
            (Path(tmp) / 'shared').symlink_to(ROOT.parent / 'shared')
        tests = sorted({t for b in breaks for t in b.tests})
        print(f'{len(breaks)} breaks; first the {len(tests)} tests on the unbroken copy ...', flush=True)
        code, output = run_tests(clean, tests, args.timeout * 2)
        if code != 0:
            print(f'the tests fail on the unbroken code (exit {code}): fix them first\n{output[-3000:]}')
            return 1
        print(f'  all pass ({time.time() - start:.0f} s)', flush=True)
        for k, b in enumerate(breaks, 1):
            t0 = time.time()
            copy = Path(tmp) / f'break_{k}'
            copy_repository(files, copy)
            try:
                apply_break(copy, b)
            except LookupError as err:
                verdict, detail = 'ERROR', str(err)
            else:
                code, output = run_tests(copy, b.tests, args.timeout)
                verdict = {0: 'SURVIVED', 1: 'CAUGHT'}.get(code, 'ERROR')
                detail = summary_line(output) if verdict != 'ERROR' else f'pytest exit {code}: {output[-1500:]}'
            shutil.rmtree(copy, ignore_errors=True)
            results.append((b, verdict))
            print(f'[{k}/{len(breaks)}] {verdict:8} {b.name} ({time.time() - t0:.0f} s)\n    {b.file}: '
                  f'{b.line.strip()}\n    {detail}', flush=True)
    bad = [(b, v) for b, v in results if v != 'CAUGHT']
    print(f'\n{len(results) - len(bad)} of {len(results)} breaks caught in {time.time() - start:.0f} s')
    for b, v in bad:
        print(f'  {v}: {b.name}')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
